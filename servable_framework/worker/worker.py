"""The Worker process: one servable version. Imports ``servable_config.py``, loads its models (or drives
its Agents when the servable is distributed), registers with Main, then serves PREDICT messages.

Ordering: the socket to Main is connected *before* anything can fail, so a start failure reaches Main as a
FAILED message with the original error text (Main raises ``Fail to start workers: ...``).
Requests run in a thread pool (Python stages in parallel, model stages batched by `ModelBatcher`); the
asyncio loop only moves messages and answers heartbeats, so a long model call never delays a PONG. A request's
thread also encodes its RESULT; the loop only sends the frames (one hand-off each way per request).
Exception: a small request of a method made of model stages only, whose models are all idle and proved fast
(`ModelBatcher.loop_safe`: a few ms at most per call), runs right on the loop, where the two hand-offs would
cost more than the model itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq.asyncio

from servable_framework import memtune, procs, shm, transport, unixlink
from servable_framework.errors import InvalidInput, ServingError
from servable_framework.logs import setup_logging
from servable_framework.main.metrics import token_counts
from servable_framework.main.rest_codec import encode_error, parse_body, render_json, render_results
from servable_framework.servable.declare import GraphRunner
from servable_framework.servable.loader import LoadedServable, load_servable, resolve_version
from servable_framework.wire import (
    Frame,
    Instance,
    Kind,
    Value,
    decode_instances,
    encode_instances,
    encode_reply,
    encode_value,
    error_entry,
    pack,
    unpack,
)
from servable_framework.worker.batcher import ModelBatcher
from servable_framework.worker.cancel import CancelToken
from servable_framework.worker.pipeline import MethodRunner
from servable_framework.worker.signatures import method_signatures
from servable_framework.worker.streaming import Piece
from servable_framework.worker.values import from_stage_output

log = logging.getLogger("servable_framework.worker")

REQUEST_THREADS = 16
LOOP_MAX_BYTES = 64 * 1024  # a request carrying more tensor bytes than this never runs on the event loop


def batcher_key(model_key: str, subgraph: int) -> str:
    """Key of a sub-graph's batcher in ``Worker.batchers`` (and its name in ``/metrics``): sub-graph 0, the one
    `add_stage` runs, is keyed by the model key, as the method runner looks it up."""
    return model_key if subgraph == 0 else f"{model_key}[subgraph {subgraph}]"


class Worker:
    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        self.worker_id: str = payload["worker_id"]
        self.ctx = zmq.asyncio.Context()
        # every message to and from Main goes through it (`unixlink`: the loop writes and reads the socket itself)
        self.io = unixlink.LinkClient(payload["main_address"], self.worker_id.encode(), self._on_frames)
        self.io.start()
        self.loop = asyncio.get_running_loop()
        self.pool = ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix="request")
        self.runner: MethodRunner | None = None
        self.agents: Any = None  # AgentPool for distributed servables
        self.batchers: dict[str, ModelBatcher] = {}
        self.cancels: dict[Any, CancelToken] = {}  # request id -> its token, while the request runs
        self.last_ping = time.monotonic()
        self.stopping = asyncio.Event()
        self.register_header: dict[str, Any] = {}
        self._model_only: dict[str, list[ModelBatcher] | None] = {}  # method -> its batchers, None: has functions
        self.shm = shm.Mapper()  # co-located Clients' shared-memory tensors (`servable_framework.shm`)

    async def start(self) -> None:
        p = self.payload
        loaded = load_servable(p["servable_directory"], p["servable_name"])
        dist_model = loaded.spec.distributed_model
        if dist_model is not None:
            from servable_framework.worker.agent_pool import AgentPool, DistributedBackend

            self.agents = AgentPool(self.ctx, loaded.spec, p["distributed"], p["heartbeat"], self._agents_failed,
                                    self._agents_recovered)
            await self.agents.start()  # opens distributed_address first, then checks the rank table
            await self.agents.wait_ready()
            backend = DistributedBackend(self.agents, asyncio.get_running_loop())
            dist = dist_model.distributed
            assert dist is not None
            concurrency = dist.stage_size if dist.enable_pipeline_infer else 1
            delay_ms = dist_model.max_batch_delay_ms
            if dist.continuous_batching:
                # each in-flight batch holds a thread; the Agents take them in, gathering joiners for up to
                # max_batch_delay_ms themselves, so the Worker sends at once (an idle model starts at once)
                concurrency, delay_ms = max(concurrency, dist_model.max_batch_size), 0.0
            self.batchers[dist_model.key] = ModelBatcher(backend, dist_model.key, delay_ms, concurrency)
        else:
            p["version"] = resolve_version(p["servable_directory"], p["servable_name"], p["version"],
                                           has_models=bool(loaded.spec.models))
            self._load_local(loaded)
        self._bind_handles(loaded)
        self.runner = MethodRunner(loaded.spec, self.batchers)
        # what Main routes by: the resolved version, each method's required inputs, the servable's deadline
        self.register_header = {
            "worker_id": self.worker_id, "version": p["version"],
            "methods": {name: m.required_inputs for name, m in loaded.spec.methods.items()},
            "streaming": sorted(name for name, m in loaded.spec.methods.items() if m.stream),
            "request_timeout_s": loaded.spec.request_timeout_s,
            # Main cuts a request's instances into chunks of whole batches over the Workers (0: no model)
            "batch_size": min((b.backend.batch_size for b in self.batchers.values()), default=0),
            # inputs/outputs with what is known of their types, for protocol metadata (KServe v2)
            "signatures": method_signatures(loaded.spec, {k: b.backend for k, b in self.batchers.items()})}
        self.io.send(Kind.REGISTER, self.register_header)
        log.info("servable '%s' version %d ready, methods: %s", loaded.spec.name, p["version"],
                 sorted(self.register_header["methods"]))

    def _load_local(self, loaded: LoadedServable) -> None:
        import torch

        from servable_framework.worker.local_model import LocalModel

        p = self.payload
        device = torch.device("cpu")
        if p.get("device_id") is not None and p.get("device_type") in (None, "gpu") and torch.cuda.is_available():
            device = torch.device("cuda", p["device_id"])
        version_dir = os.path.join(p["servable_directory"], p["servable_name"], str(p["version"]))
        for spec in loaded.spec.models:
            for subgraph in range(spec.subgraph_count):  # one file each, batched apart: shapes differ
                t0 = time.perf_counter()
                model = LocalModel(spec, version_dir, device, subgraph)
                log.info("loaded model '%s' (%s) on %s in %.2f s, batch size %d", spec.files[subgraph],
                         spec.model_format, device, time.perf_counter() - t0, model.batch_size)
                key = batcher_key(spec.key, subgraph)
                self.batchers[key] = ModelBatcher(model, key, spec.max_batch_delay_ms)

    def _bind_handles(self, loaded: LoadedServable) -> None:
        """Make ``Model.call`` usable from stage functions: each sub-graph goes through its batcher (sub-graph 0:
        the one `add_stage` uses, so both kinds of callers are batched together)."""
        for handle in loaded.handles:
            graphs = []
            for subgraph in range(handle.spec.subgraph_count):
                batcher = self.batchers[batcher_key(handle.spec.key, subgraph)]

                def call(instances: list[list[Any]], batcher: ModelBatcher = batcher) -> list[list[Value]]:
                    futures = batcher.submit([[from_stage_output(v) for v in inst] for inst in instances])
                    out = []
                    for fut in futures:
                        try:
                            out.append(fut.result())
                        except ServingError as exc:
                            raise RuntimeError(exc.message) from None
                    return out

                graphs.append(GraphRunner(getattr(batcher.backend, "inputs_count", None), call))
            handle.bind(graphs)

    async def serve(self) -> None:
        watchdog = asyncio.create_task(self._watch_main())
        await self.stopping.wait()
        watchdog.cancel()

    def _on_frames(self, frames: list[Frame]) -> None:
        """One message from Main (called by the link on the loop; must not block)."""
        try:
            kind, header, buffers = unpack(frames)
        except InvalidInput as exc:
            log.warning("dropping malformed message from Main: %s", exc)
            return
        if kind is Kind.PING:
            self.last_ping = time.monotonic()
            self.io.send(Kind.PONG, {"worker_id": self.worker_id, "batches": self._batch_stats()})
        elif kind is Kind.PREDICT:
            request_id = header.get("id")
            token = self.cancels[request_id] = CancelToken()
            if header.get("stream") is True:
                transport.spawn(self._predict_stream(request_id, header, buffers, token))
            elif header.get("rest") is True or header.get("zmq") is True:
                forwarded = self._predict_rest if header.get("rest") is True else self._predict_zmq
                if self._loop_safe(header.get("method"), buffers):
                    forwarded(request_id, header, buffers, frames, token, on_loop=True)
                else:
                    self.pool.submit(forwarded, request_id, header, buffers, frames, token)
            elif "shm_out" not in header and self._loop_safe(header.get("method"), buffers):
                self._predict(request_id, header, buffers, frames, token, on_loop=True)
            else:
                self.pool.submit(self._predict, request_id, header, buffers, frames, token)
        elif kind is Kind.CANCEL:
            running = self.cancels.get(header.get("id"))
            if running is not None:
                log.info("request %s cancelled by Main (timed out)", header.get("id"))
                running.cancel()
        elif kind is Kind.EXIT:
            log.info("Main asked this worker to exit")
            self.stopping.set()

    def _loop_safe(self, method: Any, buffers: Any) -> bool:
        """Whether a PREDICT of ``method`` with these buffers may run on the loop (module docstring)."""
        if self.runner is None or not isinstance(method, str) or sum(len(b) for b in buffers) > LOOP_MAX_BYTES:
            return False
        if method not in self._model_only:
            spec = self.runner.spec.methods.get(method)
            if spec is None:  # the runner answers that one (not cached: names come from outside)
                return False
            stages = spec.stages if not spec.stream else []
            models = [self.batchers.get(s.model.key) if s.model is not None else None for s in stages]
            self._model_only[method] = [b for b in models if b is not None] \
                if stages and all(b is not None for b in models) else None
        batchers = self._model_only[method]
        return batchers is not None and all(b.loop_safe() for b in batchers)

    def _predict(self, request_id: Any, header: dict[str, Any], buffers: Any, frames: Any, token: CancelToken,
                 on_loop: bool = False) -> None:
        """PREDICT ``{"id", "method", "instances"[, "shm_out"]}`` on a request thread (or ``on_loop``): run it,
        encode the RESULT here and hand only its frames to the loop (``{"id", "results": [{"ok": outputs} |
        {"error": ...}]}`` or ``{"id", "error"}`` for the whole request). Shared-memory inputs are mapped, large
        outputs go to the ``shm_out`` reply space when one is offered (`servable_framework.shm`)."""
        reply: dict[str, Any]
        out_buffers: list[Any] = []
        try:
            instances = decode_instances(header.get("instances"), buffers, self.shm.array)
            writer = self.shm.writer(shm.parse_space(header.get("shm_out")))
            place = None if writer is None else writer.place
            assert self.runner is not None
            results = self.runner.run(str(header.get("method")), instances, token, None)
            encoded = []
            for res in results:
                if isinstance(res, ServingError):
                    encoded.append({"error": res.to_wire()})
                else:
                    try:
                        encoded.append({"ok": encode_instances([res], out_buffers, place)[0]})
                    except ServingError as exc:
                        encoded.append({"error": exc.to_wire()})
            reply = {"id": request_id, "results": encoded, "batches": self._batch_stats()}
        except ServingError as exc:
            reply, out_buffers = {"id": request_id, "error": exc.to_wire()}, []
        except Exception as exc:  # a bug in the framework: report it, keep serving
            log.exception("request %s failed", request_id)
            reply, out_buffers = {"id": request_id, "error": ServingError(f"System error: {exc}").to_wire()}, []
        self._reply(request_id, pack(Kind.RESULT, reply, out_buffers), frames, on_loop)

    def _predict_rest(self, request_id: Any, header: dict[str, Any], buffers: Any, frames: Any, token: CancelToken,
                      on_loop: bool = False) -> None:
        """PREDICT ``{"id", "method", "rest": true, "max_instances"}`` whose one buffer is a MindSpore REST body
        that Main forwarded unparsed (`servable_framework.main.dispatcher.Dispatcher.predict_rest`): parse it,
        run it and render the whole HTTP answer here (`rest_codec.render_results`), as `_predict_forwarded`
        says. The reply's own fields: ``"status"``, with the JSON body as its one buffer."""
        def render(results: list[Any]) -> tuple[dict[str, Any], list[Any]]:
            status, body = render_results(results)
            return {"status": status}, [body]

        def render_error(exc: ServingError) -> tuple[dict[str, Any], list[Any]]:
            return {"status": exc.http_status}, [render_json(encode_error(exc))]

        self._predict_forwarded(request_id, header, lambda: parse_body(bytes(buffers[0]) if buffers else b""),
                                render, render_error, frames, token, on_loop)

    def _predict_zmq(self, request_id: Any, header: dict[str, Any], buffers: Any, frames: Any, token: CancelToken,
                     on_loop: bool = False) -> None:
        """PREDICT ``{"id", "method", "zmq": true, "instances", "max_instances"}``: a ZMQ Client's instances that
        Main forwarded undecoded (`servable_framework.main.dispatcher.Dispatcher.predict_zmq`; never with
        shared-memory tensors): decode them, run them and render the Client's RESULT here (`wire.encode_reply`),
        as `_predict_forwarded` says. The reply's own field: ``"answer"``, that RESULT's header but for its id,
        with the outputs' buffers."""
        def render(results: list[Any]) -> tuple[dict[str, Any], list[Any]]:
            answer, out = encode_reply(results)
            return {"answer": answer}, out

        def render_error(exc: ServingError) -> tuple[dict[str, Any], list[Any]]:
            return {"answer": {"error_msg": [error_entry(exc)]}}, []

        self._predict_forwarded(request_id, header, lambda: decode_instances(header.get("instances"), buffers),
                                render, render_error, frames, token, on_loop)

    def _predict_forwarded(self, request_id: Any, header: dict[str, Any], decode: Callable[[], list[Instance]],
                           render: Callable[[list[Any]], tuple[dict[str, Any], list[Any]]],
                           render_error: Callable[[ServingError], tuple[dict[str, Any], list[Any]]], frames: Any,
                           token: CancelToken, on_loop: bool) -> None:
        """A request Main forwarded as it came: ``decode`` its instances, check them as Main's admission would
        (count, the ``max_instances`` limit, required inputs, with its texts), run them and ``render`` the
        answer (``render_error`` for an error of the whole request). Replies ``{"id", "at", "count", "tokens",
        ...}`` with the rendered fields and buffers; ``at`` is how far the request got, which Main's counting
        follows: ``"parse"`` (the instances were refused as sent), ``"admit"`` (refused by the checks),
        ``"run"`` (it failed whole), ``"done"`` (answered; single instances may have failed).
        ``count``/``tokens``: its instances and their (prompt, generated) tokens, when done."""
        at, count, tokens = "parse", 0, (0, 0)
        try:
            instances = decode()
            at = "admit"
            assert self.runner is not None
            method = self.runner.method(str(header.get("method")))
            limit = header.get("max_instances")
            self.runner.admit(method, instances, limit if isinstance(limit, int) else None)
            at = "run"
            results = self.runner.run_admitted(method, instances, token)
            fields, out = render(results)
            at, count, tokens = "done", len(instances), token_counts(results)
        except ServingError as exc:
            fields, out = render_error(exc)
        except Exception as exc:  # a bug in the framework: report it, keep serving
            log.exception("request %s failed", request_id)
            at = "run"
            fields, out = render_error(ServingError(f"System error: {exc}"))
        reply = {"id": request_id, "at": at, "count": count, "tokens": list(tokens), **fields,
                 "batches": self._batch_stats()}
        self._reply(request_id, pack(Kind.RESULT, reply, out), frames, on_loop)

    def _reply(self, request_id: Any, out: list[Any], frames: Any, on_loop: bool) -> None:
        """Send a request's RESULT from the loop (now, ``on_loop``) or from a request thread (handed over)."""
        if on_loop:
            self._answer(request_id, out, frames)
            return
        try:  # ``frames`` travels along: stages may have returned zero-copy views of the input buffers
            self.loop.call_soon_threadsafe(self._answer, request_id, out, frames)
        except RuntimeError:  # the loop is closed: this Worker is exiting, Main fails the request
            pass

    def _answer(self, request_id: Any, frames_out: list[Any], _frames_in: Any) -> None:
        self.cancels.pop(request_id, None)
        self.io.send_frames(frames_out)

    async def _predict_stream(self, request_id: Any, header: dict[str, Any], buffers: Any,
                              token: CancelToken) -> None:
        """PREDICT with ``"stream": true``: STREAM messages ``{"id", "pieces": [...]}`` (`_StreamSender`) first,
        then a RESULT that only ends the request (``{"id", "streamed": true}``; every instance's outcome was in
        its last piece) or fails it whole."""
        loop = asyncio.get_running_loop()
        sender = _StreamSender(self.io, request_id, loop)
        try:
            instances = decode_instances(header.get("instances"), buffers, self.shm.array)
            assert self.runner is not None
            await loop.run_in_executor(self.pool, self.runner.run, str(header.get("method")), instances, token,
                                       sender)
        except ServingError as exc:
            self.io.send(Kind.RESULT, {"id": request_id, "error": exc.to_wire()})
            return
        except Exception as exc:  # a bug in the framework: report it, keep serving
            log.exception("request %s failed", request_id)
            self.io.send(Kind.RESULT, {"id": request_id, "error": ServingError(f"System error: {exc}").to_wire()})
            return
        finally:
            self.cancels.pop(request_id, None)
        # the pieces were handed to the loop before the run ended: sent already, the RESULT cannot overtake them
        self.io.send(Kind.RESULT, {"id": request_id, "streamed": True, "batches": self._batch_stats()})

    def _batch_stats(self) -> dict[str, list[int]]:
        return {k: [b.batches_run, b.instances_run, getattr(b.backend, "joined", 0), getattr(b.backend, "cancelled", 0),
                    b.instances_dropped] for k, b in self.batchers.items()}

    async def _watch_main(self) -> None:
        """Main pings every interval; silence beyond the timeout means Main is wedged or gone, and so does the
        end of the link's connection (Main never closes it while it wants this Worker)."""
        hb = self.payload["heartbeat"]
        while True:
            await asyncio.sleep(hb["interval_s"])
            if self.io.lost.is_set():
                log.error("the connection to Main is gone, exiting")
                self.stopping.set()
                return
            if time.monotonic() - self.last_ping > hb["timeout_s"]:
                log.error("no heartbeat from Main for %.1f s, exiting", hb["timeout_s"])
                self.stopping.set()
                return

    def _agents_failed(self, reason: str) -> None:
        """Called by the AgentPool when an Agent dies or goes silent: tell Main now, then keep serving errors."""
        self.io.send(Kind.FAILED, {"worker_id": self.worker_id, "error": reason, "fatal": False})

    def _agents_recovered(self) -> None:
        """All Agents re-joined: register again, Main routes to this Worker again."""
        log.info("agents recovered, servable available again")
        self.io.send(Kind.REGISTER, self.register_header)

    async def close(self) -> None:
        if self.agents is not None:
            await self.agents.close()
        for batcher in self.batchers.values():
            batcher.close()
        self.io.send(Kind.EXIT, {"worker_id": self.worker_id})
        await self.io.drain(1.0)  # let the last FAILED/EXIT message reach Main
        self.io.stop()
        self.ctx.term()


class _StreamSender:
    """`StreamEmit` of one streaming request: encodes pieces on the calling thread and has the event loop send
    them to Main, in call order, as STREAM ``{"id", "pieces": [{"index", "outputs": {name: value}, "finish"}
    | {"index", "error": {"kind", "msg"}}]}``."""

    def __init__(self, io: unixlink.LinkClient, request_id: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.io, self.request_id, self.loop = io, request_id, loop

    def __call__(self, pieces: list[Piece]) -> None:
        buffers: list[Any] = []
        encoded = []
        for piece in pieces:
            item: dict[str, Any] = {"index": piece.index}
            if piece.error is None:
                try:
                    mark = len(buffers)
                    item["outputs"] = {name: encode_value(v, buffers) for name, v in piece.outputs.items()}
                    item["finish"] = piece.finish
                except ServingError as exc:
                    del buffers[mark:]
                    item.pop("outputs", None)
                    item["error"] = exc.to_wire()
            else:
                item["error"] = piece.error.to_wire()
            encoded.append(item)
        # the loop runs its callbacks in the order they were handed over: pieces leave in order
        self.loop.call_soon_threadsafe(self.io.send_frames,
                                       pack(Kind.STREAM, {"id": self.request_id, "pieces": encoded}, buffers))


async def _amain(payload: dict[str, Any]) -> int:
    worker = Worker(payload)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    procs.watch_parent(lambda: loop.call_soon_threadsafe(worker.stopping.set))
    start = asyncio.create_task(worker.start())
    stop = asyncio.create_task(worker.stopping.wait())
    await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
    if not start.done():
        start.cancel()
        log.info("stopped during start-up")
        await worker.close()
        return 1
    if start.exception() is not None:
        exc = start.exception()
        text = exc.message if isinstance(exc, ServingError) else str(exc)
        log.error("worker start failed: %s", text, exc_info=exc)
        worker.io.send(Kind.FAILED, {"worker_id": worker.worker_id, "error": text, "fatal": True})
        await worker.io.drain(30.0)  # Main must hear why (it may not be connected yet)
        await worker.close()
        return 1
    await worker.serve()
    await worker.close()
    return 0


def worker_main() -> None:
    payload = procs.read_payload()
    assert payload is not None, "a Worker is always spawned with its payload"
    memtune.keep_freed_memory(int(payload.get("keep_freed_mib", 0)))  # before the threads start
    setup_logging(f"worker:{payload['servable_name']}")
    if payload.get("device_id") is not None:
        os.environ["SERVING_DEVICE_ID"] = str(payload["device_id"])  # user code may read it at import
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=transport.new_event_loop) as runner:  # uvloop
            code = runner.run(_amain(payload))
    else:  # pragma: no cover
        code = asyncio.run(_amain(payload))
    procs.exit_now(code)
