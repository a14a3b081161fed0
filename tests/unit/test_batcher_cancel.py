"""`ModelBatcher` with a cancelled request: queued instances never reach the model; the running ones are
handed to a streaming backend together with their tokens."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest

from servable_framework.worker.batcher import ModelBatcher
from servable_framework.worker.cancel import CancelToken


class GatedBackend:
    """Records every batch; the first call blocks until ``release`` is set (a long generation)."""

    batch_size = 4

    def __init__(self) -> None:
        self.calls: list[list[float]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def check_instance(self, values):
        return values

    def run(self, instances):
        self.calls.append([float(v[0]) for v in instances])
        self.started.set()
        assert self.release.wait(10)
        return [[v[0] * 2] for v in instances]


class StreamingGated(GatedBackend):
    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[list[CancelToken | None]] = []

    def run_streaming(self, instances, on_result, cancels):
        self.tokens.append(list(cancels))
        return self.run(instances)


def test_queued_instances_of_a_cancelled_request_never_run() -> None:
    backend = GatedBackend()
    batcher = ModelBatcher(backend, "gated", max_batch_delay_ms=0)
    try:
        first = batcher.submit([[np.float32(1)]])
        assert backend.started.wait(10)  # the first batch runs and holds the model
        token = CancelToken()
        queued = batcher.submit([[np.float32(2)], [np.float32(3)]], token)
        other = batcher.submit([[np.float32(4)]])
        token.cancel()
        backend.release.set()
        assert first[0].result(10) == [2.0] and other[0].result(10) == [8.0]
        for fut in queued:
            with pytest.raises(CancelledError):
                fut.result(10)
        assert backend.calls == [[1.0], [4.0]]
        assert batcher.instances_dropped == 2 and batcher.instances_run == 2
    finally:
        backend.release.set()
        batcher.close()


def test_running_instances_carry_their_token_to_a_streaming_backend() -> None:
    backend = StreamingGated()
    batcher = ModelBatcher(backend, "gated", max_batch_delay_ms=0)
    try:
        token = CancelToken()
        fut = batcher.submit([[np.float32(1)]], token)[0]
        assert backend.started.wait(10)
        token.cancel()  # too late to drop it: the backend holds the token and decides
        backend.release.set()
        assert fut.result(10) == [2.0]
        assert backend.tokens == [[token]] and token.cancelled
    finally:
        backend.release.set()
        batcher.close()


def test_cancel_token_runs_each_callback_once_even_when_registered_late() -> None:
    token, seen = CancelToken(), []
    token.on_cancel(lambda: seen.append("early"))
    token.cancel()
    token.cancel()
    token.on_cancel(lambda: seen.append("late"))
    assert seen == ["early", "late"]
