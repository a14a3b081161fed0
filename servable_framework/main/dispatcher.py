"""Main's data plane: route a request to a READY Worker of its servable/version and await the answer.

Both front ends (REST and ZMQ) call `Dispatcher.predict` (or `Dispatcher.predict_stream`); admission control
(queue limit, instance limit), version selection, timeouts and the "not available" errors of contract §8.6
live here only. So do the per-request metrics (`servable_framework.main.metrics`): each caller passes its
``protocol`` label (``"rest"``, ``"zmq"``, ``"openai"``, ``"kserve"``). MindSpore's predicts for an endpoint with
one READY Worker first try `Dispatcher.predict_rest` / `Dispatcher.predict_zmq`, which send the request to that
Worker as it came (`Dispatcher._forward`: the same checks, texts and metrics, done by the Worker).

Busy polling (`Dispatcher._spin`, `servable_framework.busy_poll`): while a single request is in flight, Main polls
for its Worker's answer instead of sleeping, when that Worker answered the method within the budget last time.

Spreading (`Dispatcher._plan`): a request of several instances is cut into contiguous chunks, one per READY
Worker of its endpoint (device Workers and extra workers alike), in whole model batches (the Workers' batch
size from their REGISTER); the least-loaded Workers take them, the answers are merged back in instance order.
A chunk that fails as a whole fails only its own instances (per-instance errors), unless every chunk failed
(the request fails with the first chunk's error, as it would on one Worker) or the deadline passed (the
request times out). Streaming requests run on one Worker.

Fail-over (`Dispatcher._run_chunk`): instances in flight on a Worker that dies (`WorkerLost`) are re-run once
on a sibling READY Worker, as MindSpore re-queues a dead Worker's pending instances (contract §7.2); with no
sibling, or when the sibling dies too, they fail with the error naming the dead Worker. Inference is taken to
be free of side effects; the single retry bounds what a request that itself kills Workers can do (two Workers).
Streaming requests are not re-run (pieces may have reached the client).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from servable_framework import transport
from servable_framework.busy_poll import BusyPoll
from servable_framework.errors import (
    NotFound,
    Overloaded,
    RequestTimeout,
    ServingError,
    Unavailable,
)
from servable_framework.main.metrics import DispatcherCollector, Metrics, Outcome, outcome_of
from servable_framework.main.workers import StreamItem, WorkerHandle, WorkerLost, WorkerSet, WorkerState
from servable_framework.settings import Settings
from servable_framework.shm import ReplySpace, keep_reference
from servable_framework.wire import (
    Instance,
    Kind,
    check_instance_count,
    check_required_inputs,
    decode_value,
    encode_instances,
)
from servable_framework.worker.streaming import not_streaming

Result = Instance | ServingError
Chunk = tuple[WorkerHandle, int, int]  # a Worker and the instance range [start, stop) it runs

log = logging.getLogger("servable_framework.main")

# the largest REST body `Dispatcher.predict_rest` forwards unparsed. Small bodies are where a request's fixed
# costs dominate, and moving them off Main pays (tensor_add, 2 inputs of 2x2: Main 480 -> 320 us of CPU per
# request under wrk c=8, c=1 p50 -14 %). A large body's parse is the bulk of its work, and it cost a Distributed
# Worker (its request threads share the interpreter with the loop and the Agent links) more than it costs Main:
# the 53 KB MatMul body, wrk c=8: Main -2.4 ms but the Distributed Worker +3.6 ms of CPU, 178 -> 115 req/s.
FORWARD_MAX_BYTES = 16 * 1024


@dataclass
class StreamPiece:
    """One piece of a streaming request: for instance ``index``, the new part of each output (see
    `servable_framework.worker.streaming`) and, on its last piece, ``finish`` (the model's reason: ``"eos"``,
    ``"length"``, ``"stop"``, ``"cancelled"``, or ``"done"`` when the model did not say); or ``error``, which
    ended that instance (also its last piece)."""

    index: int
    outputs: Instance
    finish: str | None = None
    error: ServingError | None = None


@dataclass
class RestAnswer:
    """`Dispatcher.predict_rest`'s answer, rendered by the Worker: the HTTP status and the JSON body."""

    status: int
    body: Any  # bytes or a read-only memoryview of the received frame


class Dispatcher:
    def __init__(self, workers: WorkerSet, settings: Settings) -> None:
        self.workers = workers
        self.settings = settings
        self._ids = itertools.count(1)
        self._turn = 0
        self.inflight = 0
        self.idle = asyncio.Event()  # set whenever no request is in flight (what a drain waits for)
        self.idle.set()
        self.draining = False
        self.stats = {"requests": 0, "errors": 0, "rejected": 0}
        self.metrics = Metrics(known_servable=lambda name: any(
            h.servable == name for h in self.workers.workers.values()))
        self.metrics.add_collector(DispatcherCollector(self))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy_budget_s = settings.busy_poll_us * 1e-6
        self._busy_poll: BusyPoll | None = None  # made on the loop, at the first spin

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running event loop (Main's; remembered: ``asyncio.get_running_loop`` makes a ``getpid`` system
        call on every call in Python 3.11, several times per request)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _spec(self, servable: str, method: str, version: int) -> str:
        v = f" version({version})" if version else ""
        return f"Request servable({servable}) method({method}){v}"

    def pick(self, servable: str, method: str, version: int) -> WorkerHandle:
        """The least-loaded READY Worker (idle ones in turn), or the contract's error for why there is none."""
        ready = self._ready(servable, method, version)
        least = min(_load(h) for h in ready)
        tied = [h for h in ready if _load(h) == least]
        self._turn += 1  # ties (idle Workers) take turns: sequential requests use every Worker too
        return tied[self._turn % len(tied)]

    def _ready(self, servable: str, method: str, version: int) -> list[WorkerHandle]:
        """The READY Workers a request may go to (at least one), or the contract's error for why there is none."""
        handles = [h for h in self.workers.workers.values() if h.servable == servable]
        if version:
            handles = [h for h in handles if h.version == version]
        elif handles:
            newest = max(h.version for h in handles)
            handles = [h for h in handles if h.version == newest]
        if not handles:
            raise NotFound(f"{self._spec(servable, method, version)} , servable is not available")
        ready = [h for h in handles if h.state is WorkerState.READY]
        if not ready:
            reasons = "; ".join(sorted({h.reason or h.state.value for h in handles}))
            raise Unavailable(f"{self._spec(servable, method, version)} , servable is not available: {reasons}")
        if method not in ready[0].methods:
            raise NotFound(f"{self._spec(servable, method, version)} , method is not available")
        return ready

    def _siblings(self, handle: WorkerHandle, method: str) -> list[WorkerHandle]:
        """READY Workers of ``handle``'s endpoint (same servable and version) that serve ``method``, least
        loaded first (``handle`` itself included when READY)."""
        out = [h for h in self.workers.workers.values()
               if h.servable == handle.servable and h.version == handle.version and h.state is WorkerState.READY
               and method in h.methods]
        return sorted(out, key=_load)

    def _plan(self, first: WorkerHandle, method: str, count: int) -> list[Chunk]:
        """Cut ``count`` instances into contiguous chunks over the least-loaded READY Workers of ``first``'s
        endpoint: whole batches of the Workers' batch size (the last chunk may end with a partial one), spread
        as evenly as batches allow, never more chunks than batches. One chunk on ``first`` when there is
        nothing to spread."""
        if count < 2:
            return [(first, 0, count)]
        peers = self._siblings(first, method)
        if len(peers) < 2:
            return [(first, 0, count)]
        peers.remove(first)
        peers.insert(0, first)  # the picked Worker takes the first chunk: the order is the load order anyway
        unit = max(1, first.batch_size)
        batches = math.ceil(count / unit)
        k = min(len(peers), batches)
        if k < 2:
            return [(first, 0, count)]
        base, extra = divmod(batches, k)
        chunks: list[Chunk] = []
        start = 0
        for i, handle in enumerate(peers[:k]):
            stop = min(count, start + (base + (1 if i < extra else 0)) * unit)
            chunks.append((handle, start, stop))
            start = stop
        return chunks

    def _admit(self, servable: str, method: str, version: int, instances: list[Instance]) -> WorkerHandle:
        """Count the request and pick its Worker, or raise the error that refuses it."""
        self.stats["requests"] += 1
        if self.draining:
            raise Unavailable("Serving Error: server is shutting down")
        if self.inflight >= self.settings.max_enqueued_requests:
            self.stats["rejected"] += 1
            raise Overloaded(f"Serving Error: enqueued requests count exceeds the limit "
                             f"{self.settings.max_enqueued_requests}")
        check_instance_count(instances, self.settings.max_instances_per_request)
        handle = self.pick(servable, method, version)
        check_required_inputs(instances, handle.methods[method], servable, method)
        return handle

    def _started(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def _ended(self) -> None:
        self.inflight -= 1
        if not self.inflight:
            self.idle.set()

    async def predict(self, servable: str, method: str, version: int, instances: list[Instance],
                      timeout_s: float | None = None, *, protocol: str = "rest",
                      reply_space: ReplySpace | None = None) -> list[Result]:
        """Run one request; returns one result (outputs or error) per instance, in order. ``protocol``: the
        caller's label on the request's metrics. ``reply_space``: shared memory a co-located ZMQ Client offers
        for large outputs (used when the request runs on one Worker; outputs it holds come back as
        `ShmTensor` references)."""
        start = time.perf_counter()
        handle = self._admit(servable, method, version, instances)
        record = self.metrics.request(servable, protocol, start)
        self._started()
        outcome: Outcome = "error"
        try:
            timeout = timeout_s or handle.request_timeout_s or self.settings.request_timeout_s
            results = await self._spread(handle, method, instances, timeout, reply_space)
            record.results(results)
            outcome = "ok"
            return results
        except ServingError:
            self.stats["errors"] += 1
            raise
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            record.finish(outcome)
            self._ended()

    async def predict_rest(self, servable: str, method: str, version: int, body: bytes,
                           timeout_s: float | None = None) -> RestAnswer | None:
        """MindSpore's REST predict with the body forwarded unparsed: the Worker parses it, runs it and renders
        the answer (`servable_framework.worker.worker.Worker._predict_rest`), so Main's share of a request is
        its routing, deadline and metrics, and the JSON work runs in the Worker's process, next to Main's.
        Same answers, texts and metrics as parsing it here and calling `predict` (`_forward`). None: the
        request must go that other way (parsed here): a body over `FORWARD_MAX_BYTES`, or `_forward`'s cases."""
        if len(body) > FORWARD_MAX_BYTES:
            return None
        forwarded = await self._forward(servable, method, version, {"rest": True}, [body], timeout_s, "rest")
        if forwarded is None:
            return None
        reply, buffers = forwarded
        return RestAnswer(int(reply["status"]), buffers[0] if buffers else b"")

    async def predict_zmq(self, servable: str, method: str, version: int, instances: Any, buffers: Sequence[Any],
                          timeout_s: float | None = None) -> tuple[dict[str, Any], Any] | None:
        """A ZMQ Client's predict with its instances forwarded undecoded (``instances``: the descriptors of its
        header, ``buffers``: its tensor frames): the Worker decodes, checks and runs them and renders the
        Client's RESULT (`servable_framework.worker.worker.Worker._predict_zmq`, `wire.encode_reply`); returns
        that header (without the Client's request id) and its buffers. Same answers, texts and metrics as
        decoding them here and calling `predict` (`_forward`). None: the request must go that other way:
        shared-memory tensors in it (Main's setting decides whether they are taken), or `_forward`'s cases."""
        if not isinstance(instances, list) or not all(
                isinstance(inst, dict) and all(not isinstance(d, dict) or d.get("t") != "shm" for d in inst.values())
                for inst in instances):
            return None
        forwarded = await self._forward(servable, method, version, {"zmq": True, "instances": instances}, buffers,
                                        timeout_s, "zmq")
        if forwarded is None:
            return None
        reply, out = forwarded
        return reply["answer"], out

    async def _forward(self, servable: str, method: str, version: int, fields: dict[str, Any],
                       buffers: Sequence[Any], timeout_s: float | None,
                       protocol: str) -> tuple[dict[str, Any], Any] | None:
        """Send a request to its Worker as it came (``fields`` and ``buffers`` of the PREDICT), for the Worker
        to decode, check, run and render (`predict_rest`, `predict_zmq`); returns the Worker's reply and its
        buffers.
        The counting follows the reply's ``at`` (how far the request got): a refused body or malformed instances
        are not a request, refused instances are one without servable metrics (as in `_admit`), ``count`` and
        ``tokens`` come counted.

        Returns None where the request must go the decoding way: the setting ``forward_requests`` off, an
        endpoint whose READY Workers are not exactly one (instances are spread over several), an error to answer
        that comes after the request's own in `predict`'s order (not available, draining, too many requests in
        flight), or the Worker lost with the request while a sibling is READY (`predict` re-runs it there; the
        deadline starts again)."""
        if not self.settings.forward_requests or self.draining \
                or self.inflight >= self.settings.max_enqueued_requests:
            return None
        try:
            ready = self._ready(servable, method, version)
        except ServingError:
            return None
        if len(ready) != 1:  # (not `pick`: its turn must move once per request)
            return None
        handle = ready[0]
        start = time.perf_counter()
        timeout = timeout_s or handle.request_timeout_s or self.settings.request_timeout_s
        self._started()
        at = "sent"  # how far it got: "sent" (no answer yet), then the Worker's "parse"|"admit"|"run"|"done"
        outcome: Outcome = "error"
        header: dict[str, Any] = {"method": method, **fields,
                                  "max_instances": self.settings.max_instances_per_request}
        try:
            try:
                reply, out = await self._exchange(handle, header, list(buffers), timeout, timeout)
            except WorkerLost as exc:
                if any(h is not handle for h in self._siblings(handle, method)):
                    at = "parse"  # not counted: `predict` counts it
                    return None
                raise Unavailable(exc.message) from None
            if "error" in reply:  # the Worker could not take it (not loaded yet): a failure of the request
                raise ServingError.from_wire(reply["error"])
            at = str(reply.get("at"))
            if at == "done":
                outcome = "ok"
                handle.instances_answered += int(reply.get("count", 0))
            elif at == "run":
                self.stats["errors"] += 1
            return reply, out
        except ServingError:
            self.stats["errors"] += 1
            raise
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            self._ended()
            if at != "parse":
                self.stats["requests"] += 1
            if at not in ("parse", "admit"):
                record = self.metrics.request(servable, protocol, start)
                if outcome == "ok":
                    tokens = reply.get("tokens")
                    if isinstance(tokens, list) and len(tokens) == 2:
                        record.tokens(int(tokens[0]), int(tokens[1]))
                record.finish(outcome)

    async def predict_stream(self, servable: str, method: str, version: int, instances: list[Instance],
                             timeout_s: float | None = None, *, protocol: str = "rest") -> AsyncIterator[StreamPiece]:
        """Run one request of a ``stream=True`` method, yielding its pieces as the Worker sends them: every
        instance ends with exactly one piece with ``finish`` or ``error``, then the iteration ends. Raises the
        error that refuses or fails the whole request (the deadline covers the whole stream). A caller that
        stops early (``aclose``, a cancelled task) cancels the request in the Worker and on the Agents, as a
        timed-out one is (no await happens on that path: safe inside a cancelled scope). ``protocol``: the
        caller's label on the request's metrics."""
        start = time.perf_counter()
        handle = self._admit(servable, method, version, instances)
        if method not in handle.streaming:
            raise not_streaming(servable, method)
        record = self.metrics.request(servable, protocol, start)
        outcome: Outcome = "error"
        self._started()
        request_id = next(self._ids)
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        handle.streams[request_id] = queue
        finished = False
        loop = asyncio.get_running_loop()
        timeout = timeout_s or handle.request_timeout_s or self.settings.request_timeout_s
        deadline = loop.time() + timeout
        try:
            buffers: list[Any] = []
            header = {"id": request_id, "method": method, "instances": encode_instances(instances, buffers),
                      "stream": True}
            try:
                await self.workers.send(handle, Kind.PREDICT, header, buffers)
            except WorkerLost as exc:  # streams are not re-run elsewhere; the front ends know Unavailable only
                finished = True
                raise Unavailable(exc.message) from None
            while True:
                try:
                    item = queue.get_nowait() if not queue.empty() else \
                        await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise RequestTimeout(f"Request timed out after {timeout:g} s") from None
                if isinstance(item, ServingError):  # the Worker died or became unavailable
                    finished = True
                    raise item
                kind, reply, out_buffers, _frames = item
                if kind is Kind.RESULT:
                    finished = True
                    if "error" in reply:
                        raise ServingError.from_wire(reply["error"])
                    outcome = "ok"
                    return
                for raw in reply.get("pieces", []):
                    piece = _decode_piece(raw, out_buffers)
                    if piece.error is None:
                        record.piece(piece.index, piece.outputs)
                    yield piece
        except ServingError:
            self.stats["errors"] += 1
            raise
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            record.finish(outcome)
            handle.streams.pop(request_id, None)
            if not finished and self.settings.cancel_abandoned:
                transport.spawn(self._cancel(handle, request_id))
            self._ended()

    async def _cancel(self, handle: WorkerHandle, request_id: int) -> None:
        """Tell the Worker to stop what it can of an abandoned request (best effort)."""
        try:
            await self.workers.send(handle, Kind.CANCEL, {"id": request_id})
        except Exception:
            pass

    async def _spread(self, first: WorkerHandle, method: str, instances: list[Instance], timeout_s: float,
                      reply_space: ReplySpace | None = None) -> list[Result]:
        """Run ``instances`` over the endpoint's Workers (`_plan`) within one deadline; results in order. The
        reply space goes with a request that runs whole on one Worker only (chunks would share it)."""
        deadline = self.loop().time() + timeout_s
        plan = self._plan(first, method, len(instances))
        if len(plan) == 1:
            return await self._run_chunk(first, method, instances, deadline, timeout_s, reply_space)
        outcomes = await asyncio.gather(
            *(self._run_chunk(h, method, instances[a:b], deadline, timeout_s) for h, a, b in plan),
            return_exceptions=True)
        for outcome in outcomes:  # a bug or a cancelled chunk propagates; so does the request's deadline
            if isinstance(outcome, BaseException) and not isinstance(outcome, ServingError):
                raise outcome
            if isinstance(outcome, RequestTimeout):
                raise outcome
        errors = [o for o in outcomes if isinstance(o, ServingError)]
        if len(errors) == len(outcomes):
            raise errors[0]  # the whole request failed, as it would have on one Worker
        results: list[Result] = []
        for (_h, a, b), outcome in zip(plan, outcomes):
            if isinstance(outcome, ServingError):
                results.extend([outcome] * (b - a))
            else:
                assert isinstance(outcome, list)
                results.extend(outcome)
        return results

    async def _run_chunk(self, handle: WorkerHandle, method: str, instances: list[Instance], deadline: float,
                         timeout_s: float, reply_space: ReplySpace | None = None) -> list[Result]:
        """Run ``instances`` on ``handle``; when that Worker is lost with them in flight, once more on the
        least-loaded sibling READY Worker. Raises `Unavailable` (never `WorkerLost`) naming the lost Worker when
        no sibling can take them."""
        loop = self.loop()
        retried = False
        while True:
            try:
                results = await self._call(handle, method, instances, deadline - loop.time(), timeout_s,
                                           reply_space)
            except WorkerLost as exc:
                siblings = [h for h in self._siblings(handle, method) if h is not handle]
                if retried or not siblings or loop.time() >= deadline:
                    raise Unavailable(exc.message) from None
                log.warning("re-running %d instance(s) of a request on worker %s: %s", len(instances),
                            siblings[0].worker_id, exc.message)
                handle, retried = siblings[0], True
                continue
            handle.instances_answered += len(instances)
            return results

    async def _call(self, handle: WorkerHandle, method: str, instances: list[Instance], wait_s: float,
                    timeout_s: float, reply_space: ReplySpace | None = None) -> list[Result]:
        """One PREDICT to ``handle``, answered within ``wait_s`` (what is left of the request's ``timeout_s``,
        which the timeout error names)."""
        buffers: list[Any] = []
        header: dict[str, Any] = {"method": method, "instances": encode_instances(instances, buffers)}
        if reply_space is not None:
            header["shm_out"] = reply_space.header()
        reply, out_buffers = await self._exchange(handle, header, buffers, wait_s, timeout_s)
        if "error" in reply:
            raise ServingError.from_wire(reply["error"])
        results: list[Result] = []
        for item in reply.get("results", []):
            if "error" in item:
                results.append(ServingError.from_wire(item["error"]))
            else:
                results.append({k: decode_value(v, out_buffers, keep_reference) for k, v in item["ok"].items()})
        return results

    async def _exchange(self, handle: WorkerHandle, header: dict[str, Any], buffers: list[Any], wait_s: float,
                        timeout_s: float) -> tuple[dict[str, Any], Any]:
        """Send one PREDICT (``header`` gets its request id) and await its RESULT (header, buffers) within
        ``wait_s``; a timed-out or abandoned request is cancelled in the Worker."""
        if wait_s <= 0:  # a re-run found the deadline spent
            raise RequestTimeout(f"Request timed out after {timeout_s:g} s")
        request_id = header["id"] = next(self._ids)
        loop = self.loop()
        fut: asyncio.Future[Any] = loop.create_future()
        handle.inflight[request_id] = fut
        # the deadline as a timer on the reply's own future (asyncio.wait_for adds a future and callbacks)
        timer = loop.call_later(wait_s, _expire, fut)
        method = str(header.get("method"))
        try:
            await self.workers.send(handle, Kind.PREDICT, header, buffers)
            sent = time.perf_counter()
            if self.inflight == 1 and method not in handle.slow and self._busy_budget_s:
                # (after the callbacks queued already: a task made ready in this loop turn runs before the spin)
                loop.call_soon(self._spin, fut)
            reply, out_buffers, _frames = await fut
            if time.perf_counter() - sent > self._busy_budget_s:
                handle.slow.add(method)  # a spin would have ended empty: this method's next request sleeps
            else:
                handle.slow.discard(method)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            # timed out, or the caller went away (a REST client hung up): the Worker stops what it can of the
            # abandoned request: queued instances never run, generating rows stop at the next step (best
            # effort: a Worker that is gone needs no telling)
            if self.settings.cancel_abandoned:
                try:
                    await self.workers.send(handle, Kind.CANCEL, {"id": request_id})
                except Exception:
                    pass
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise RequestTimeout(f"Request timed out after {timeout_s:g} s") from None
        finally:
            timer.cancel()
            handle.inflight.pop(request_id, None)
        return reply, out_buffers

    def _spin(self, fut: asyncio.Future[Any]) -> None:
        """Busy-poll the loop (`servable_framework.busy_poll`) while the one request in flight, answered by
        ``fut``, is in its Worker."""
        if self.inflight != 1 or fut.done():  # another request came in meanwhile (Main has work), or no need
            return
        busy_poll = self._busy_poll
        if busy_poll is None:
            busy_poll = self._busy_poll = BusyPoll(self.loop(), self._busy_budget_s)
        self.metrics.busy_polls[busy_poll()].inc()

    def ready(self) -> dict[str, Any]:
        """Readiness of every servable: ready when at least one Worker of its newest version is READY."""
        out: dict[str, Any] = {}
        for h in self.workers.workers.values():
            entry = out.setdefault(h.servable, {"ready": False, "workers": []})
            entry["workers"].append({"id": h.worker_id, "version": h.version, "state": h.state.value,
                                     "reason": h.reason})
            entry["ready"] = entry["ready"] or h.state is WorkerState.READY
        return out


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


def _load(handle: WorkerHandle) -> int:
    """Requests in flight on a Worker (what picking the least loaded compares)."""
    return len(handle.inflight) + len(handle.streams)


def _decode_piece(raw: Any, buffers: Any) -> StreamPiece:
    """One piece of a Worker's STREAM message (see `servable_framework.worker.worker._StreamSender`)."""
    index = raw.get("index") if isinstance(raw, dict) else None
    if not isinstance(index, int):
        raise ServingError("malformed stream piece from the worker")
    if "error" in raw:
        return StreamPiece(index, {}, error=ServingError.from_wire(raw["error"]))
    try:
        outputs = {k: decode_value(v, buffers) for k, v in raw.get("outputs", {}).items()}
    except ServingError as exc:
        return StreamPiece(index, {}, error=exc)
    finish = raw.get("finish")
    return StreamPiece(index, outputs, finish if isinstance(finish, str) else None)
