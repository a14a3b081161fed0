"""The hot path's building blocks: `transport.LoopSocket` (ZMQ driven from the event loop's reader callback)
and `ModelBatcher`'s inline runs and ``loop_safe`` rule. Real ZMQ sockets over ipc://, a real event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from servable_framework import transport
from servable_framework.errors import ServingError
from servable_framework.wire import Kind, pack, unpack
from servable_framework.worker import batcher as batcher_mod
from servable_framework.worker.batcher import INLINE_WARMUP, ModelBatcher


def run(coro: Any) -> Any:
    loop = transport.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 30))
    finally:
        loop.close()


def test_loop_socket_queues_until_connected_keeps_order_and_drains_bursts(tmp_path: Path) -> None:
    """A DEALER sends before any peer is there (ZMQ says "again": queued), in order; a burst of replies larger
    than one reader callback's share all arrive (the edge-triggered descriptor is re-checked)."""
    endpoint = f"ipc://{tmp_path}/s"

    async def main() -> list[int]:
        ctx = zmq.asyncio.Context()
        got: list[int] = []
        done = asyncio.Event()
        count = 3 * transport.LoopSocket.BURST + 5

        def on_message(frames: list[zmq.Frame]) -> None:
            _kind, header, _ = unpack([f.buffer for f in frames])
            got.append(header["n"])
            if len(got) == count:
                done.set()

        dealer = transport.async_socket(ctx, zmq.DEALER, identity=b"w0")
        dealer.connect(endpoint)
        io = transport.LoopSocket(dealer, on_message)
        io.start()
        io.send(Kind.REGISTER, {"n": -1})  # nobody bound yet: queued
        io.send(Kind.REGISTER, {"n": -2})
        router = zmq.Socket(ctx, zmq.ROUTER)
        router.bind(endpoint)
        seen = []
        for _ in range(2):
            while not router.poll(0):
                await asyncio.sleep(0.005)
            frames = router.recv_multipart()
            seen.append(unpack(frames[1:])[1]["n"])
        assert seen == [-1, -2]
        assert await io.drain(5)
        for n in range(count):  # all at once: several reader callbacks' worth
            router.send_multipart([b"w0", *pack(Kind.RESULT, {"n": n})])
        await asyncio.wait_for(done.wait(), 20)
        io.stop()
        router.close(0)
        dealer.close(0)
        ctx.term()
        return got

    assert run(main()) == list(range(3 * transport.LoopSocket.BURST + 5))


def test_loop_socket_router_to_unknown_peer_raises(tmp_path: Path) -> None:
    """ROUTER_MANDATORY: a send to a Worker that is not connected raises at once (Main's `WorkerLost`)."""

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        router = transport.async_socket(ctx, zmq.ROUTER)
        router.bind(f"ipc://{tmp_path}/r")
        io = transport.LoopSocket(router, lambda frames: None)
        io.start()
        with pytest.raises(zmq.ZMQError):
            io.send(Kind.PREDICT, {"id": 1}, to=b"nobody")
        io.stop()
        router.close(0)
        ctx.term()

    run(main())


class TinyBackend:
    """batch size 1; records the thread of each call; ``delay_s`` per call."""

    batch_size = 1

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.threads: list[str] = []

    def check_instance(self, values: list[Any]) -> list[Any]:
        return values

    def run(self, instances: list[list[Any]]) -> list[list[Any]]:
        self.threads.append(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        return [[v[0] + 1] for v in instances]


def test_batch_size_one_runs_inline_when_idle_and_becomes_loop_safe() -> None:
    backend = TinyBackend()
    batcher = ModelBatcher(backend, "tiny", max_batch_delay_ms=0)
    try:
        assert not batcher.loop_safe()  # not proved fast yet
        for i in range(INLINE_WARMUP):
            assert batcher.submit([[np.float32(i)]])[0].result(10) == [np.float32(i + 1)]
        assert backend.threads == [threading.current_thread().name] * INLINE_WARMUP  # no hand-off
        assert batcher.loop_safe()
        assert batcher.batches_run == INLINE_WARMUP and batcher.instances_run == INLINE_WARMUP
    finally:
        batcher.close()


def test_a_slow_call_withdraws_loop_safety(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher_mod, "INLINE_MAX_S", 0.01)
    monkeypatch.setattr(batcher_mod, "INLINE_NEVER_S", 0.05)
    backend = TinyBackend()
    batcher = ModelBatcher(backend, "tiny", max_batch_delay_ms=0)
    try:
        for _ in range(INLINE_WARMUP):
            batcher.submit([[1]])[0].result(10)
        assert batcher.loop_safe()
        backend.delay_s = 0.02  # slower than INLINE_MAX_S: withdrawn until a new run of fast calls
        batcher.submit([[1]])[0].result(10)
        assert not batcher.loop_safe()
        backend.delay_s = 0.0
        for _ in range(INLINE_WARMUP):
            batcher.submit([[1]])[0].result(10)
        assert batcher.loop_safe()
        backend.delay_s = 0.06  # over INLINE_NEVER_S: never again
        batcher.submit([[1]])[0].result(10)
        backend.delay_s = 0.0
        for _ in range(2 * INLINE_WARMUP):
            batcher.submit([[1]])[0].result(10)
        assert not batcher.loop_safe()
    finally:
        batcher.close()


def test_busy_model_queues_instead_of_running_twice_at_once() -> None:
    """While one call holds the model, another submit is queued for the runner thread (one call at a time)."""
    backend = TinyBackend(delay_s=0.2)
    batcher = ModelBatcher(backend, "tiny", max_batch_delay_ms=0)
    running = 0
    peak = 0
    lock = threading.Lock()
    real_run = backend.run

    def counting_run(instances: list[list[Any]]) -> list[list[Any]]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return real_run(instances)
        finally:
            with lock:
                running -= 1

    backend.run = counting_run  # type: ignore[method-assign]
    try:
        first = threading.Thread(target=lambda: batcher.submit([[1]])[0].result(10))
        first.start()
        time.sleep(0.05)
        assert batcher.submit([[2]])[0].result(10) == [3]
        first.join(10)
        assert peak == 1
        assert any(name.startswith("batcher-") for name in backend.threads)  # the second went to the runner
    finally:
        batcher.close()


def test_errors_of_an_inline_run_fail_only_their_instance() -> None:
    class Failing(TinyBackend):
        def run(self, instances: list[list[Any]]) -> list[list[Any]]:
            raise RuntimeError("boom")

    batcher = ModelBatcher(Failing(), "failing", max_batch_delay_ms=0)
    try:
        with pytest.raises(ServingError, match="RuntimeError: boom"):
            batcher.submit([[1]])[0].result(10)
    finally:
        batcher.close()


BODIES = [
    b'{"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1, 2], [3, 4]]}]}',
    b'{"instances": {"a": true, "b": "text", "c": {"b64": "AAAA", "type": "int8", "shape": [3]}}}',
    b'{"instances": [{"x": 1}], "instances": [{"x": 2}]}',  # counted twice: json's path
    b'{"\\u0069nstances": [{"x": 1}], "instances": [{"x": 2}]}',  # an escaped duplicate: json's path
    b'{"instances": [{"x": 18446744073709551616}]}',  # beyond int64: json's path (orjson would say float)
    b'{"instances": [{"x": [0.00012345678901234567891, -12345678901234567890]}]}',  # a long int after a fraction
    b'{"instances": [{"x": [0.00012345678901234567891, 1.5e-7, 123456789012345678.5]}]}',  # long fractions only
    b'{"instances": [{"x": [1e1234567890123456789]}]}',
    b'{"instances": [{"x": 1e400}]}',
    b'{"instances": [{"x": NaN}]}',
    b'\xef\xbb\xbf{"instances": [{"x": 0.1}]}',
    b'{"instances": [{"x": "\\ud800"}]}',
    b'{"instances": [{"x": [1.0, 2]}]}',
    b'{"a": 1, "a": 2, "instances": [{"x": -0.0, "x": 5e-324}]}',
    b'{"instances": [{"x": 1}]',
    b'[' * 995 + b']' * 995,
    b'{"instances": [{"x": ' + b'[' * 600 + b'1' + b']' * 600 + b'}]}',
]


@pytest.mark.parametrize("body", BODIES)
def test_fast_json_path_answers_as_the_json_module(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """`parse_body` with orjson in front gives the same instances, or the same error text, as with `json`
    alone (every body the fast path may not vouch for goes to `json`)."""
    from servable_framework.main import rest_codec

    def outcome() -> Any:
        try:
            return ("ok", [{k: (v.dtype.str, v.tolist()) if isinstance(v, np.ndarray) else v for k, v in i.items()}
                           for i in rest_codec.parse_body(body)])
        except ServingError as exc:
            return ("error", exc.message)

    fast = outcome()
    monkeypatch.setattr(rest_codec, "_load_fast", lambda _body: None)
    assert outcome() == fast


def test_long_fractions_stay_on_the_fast_path() -> None:
    """Digits after a decimal point are a float's for both parsers: only a long run elsewhere (maybe an int
    beyond int64) sends a body to `json`."""
    from servable_framework.main import rest_codec

    assert rest_codec._load_fast(b'{"instances": [{"x": [0.00012345678901234567891, 0.5]}]}') is not None
    assert rest_codec._load_fast(b'{"instances": [{"x": [0.5, 12345678901234567890]}]}') is None
    assert rest_codec._load_fast(b'{"instances": [{"x": [0.5, -1234567890123456789]}]}') is None
