"""Main's data plane: route a request to a READY Worker of its servable/version and await the answer.

Both front ends (REST and ZMQ) call `Dispatcher.predict` (or `Dispatcher.predict_stream`); admission control
(queue limit, instance limit), version selection, timeouts and the "not available" errors of contract §8.6
live here only. So do the per-request metrics (`servable_framework.main.metrics`): each caller passes its
``protocol`` label (``"rest"``, ``"zmq"``, ``"openai"``, ``"kserve"``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from servable_framework import transport
from servable_framework.errors import (
    InvalidInput,
    NotFound,
    Overloaded,
    RequestTimeout,
    ServingError,
    Unavailable,
)
from servable_framework.main.metrics import DispatcherCollector, Metrics, Outcome, outcome_of
from servable_framework.main.workers import StreamItem, WorkerHandle, WorkerSet, WorkerState
from servable_framework.settings import Settings
from servable_framework.wire import Instance, Kind, decode_value, encode_instances
from servable_framework.worker.streaming import not_streaming

Result = Instance | ServingError


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


class Dispatcher:
    def __init__(self, workers: WorkerSet, settings: Settings) -> None:
        self.workers = workers
        self.settings = settings
        self._ids = itertools.count(1)
        self.inflight = 0
        self.idle = asyncio.Event()  # set whenever no request is in flight (what a drain waits for)
        self.idle.set()
        self.draining = False
        self.stats = {"requests": 0, "errors": 0, "rejected": 0}
        self.metrics = Metrics(known_servable=lambda name: any(
            h.servable == name for h in self.workers.workers.values()))
        self.metrics.add_collector(DispatcherCollector(self))

    def _spec(self, servable: str, method: str, version: int) -> str:
        v = f" version({version})" if version else ""
        return f"Request servable({servable}) method({method}){v}"

    def pick(self, servable: str, method: str, version: int) -> WorkerHandle:
        """The least-loaded READY Worker, or the contract's error for why there is none."""
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
        return min(ready, key=lambda h: len(h.inflight) + len(h.streams))

    def _admit(self, servable: str, method: str, version: int, instances: list[Instance]) -> WorkerHandle:
        """Count the request and pick its Worker, or raise the error that refuses it."""
        self.stats["requests"] += 1
        if self.draining:
            raise Unavailable("Serving Error: server is shutting down")
        if self.inflight >= self.settings.max_enqueued_requests:
            self.stats["rejected"] += 1
            raise Overloaded(f"Serving Error: enqueued requests count exceeds the limit "
                             f"{self.settings.max_enqueued_requests}")
        if not instances:
            raise InvalidInput("Instances count of request cannot be 0")
        if len(instances) > self.settings.max_instances_per_request:
            raise InvalidInput(f"Instances count {len(instances)} of request exceeds the limit "
                               f"{self.settings.max_instances_per_request}")
        handle = self.pick(servable, method, version)
        for inst in instances:
            for name in handle.methods[method]:
                if name not in inst:
                    raise InvalidInput(f"Cannot find input {name} in instance input , servable {servable}, "
                                       f"method {method}")
        return handle

    def _started(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def _ended(self) -> None:
        self.inflight -= 1
        if not self.inflight:
            self.idle.set()

    async def predict(self, servable: str, method: str, version: int, instances: list[Instance],
                      timeout_s: float | None = None, *, protocol: str = "rest") -> list[Result]:
        """Run one request; returns one result (outputs or error) per instance, in order. ``protocol``: the
        caller's label on the request's metrics."""
        start = time.perf_counter()
        handle = self._admit(servable, method, version, instances)
        record = self.metrics.request(servable, protocol, start)
        self._started()
        outcome: Outcome = "error"
        try:
            timeout = timeout_s or handle.request_timeout_s or self.settings.request_timeout_s
            results = await self._call(handle, method, instances, timeout)
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
            await self.workers.send(handle, Kind.PREDICT, header, buffers)
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

    async def _call(self, handle: WorkerHandle, method: str, instances: list[Instance],
                    timeout_s: float) -> list[Result]:
        request_id = next(self._ids)
        buffers: list[Any] = []
        header = {"id": request_id, "method": method, "instances": encode_instances(instances, buffers)}
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        handle.inflight[request_id] = fut
        try:
            await self.workers.send(handle, Kind.PREDICT, header, buffers)
            reply, out_buffers, _frames = await asyncio.wait_for(fut, timeout_s)
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
            handle.inflight.pop(request_id, None)
        if "error" in reply:
            raise ServingError.from_wire(reply["error"])
        results: list[Result] = []
        for item in reply.get("results", []):
            if "error" in item:
                results.append(ServingError.from_wire(item["error"]))
            else:
                results.append({k: decode_value(v, out_buffers) for k, v in item["ok"].items()})
        return results

    def ready(self) -> dict[str, Any]:
        """Readiness of every servable: ready when at least one Worker of its newest version is READY."""
        out: dict[str, Any] = {}
        for h in self.workers.workers.values():
            entry = out.setdefault(h.servable, {"ready": False, "workers": []})
            entry["workers"].append({"id": h.worker_id, "version": h.version, "state": h.state.value,
                                     "reason": h.reason})
            entry["ready"] = entry["ready"] or h.state is WorkerState.READY
        return out


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
