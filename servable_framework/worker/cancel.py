"""Cancellation of one request inside the Worker (Main gave up on it: its timeout passed).

A `CancelToken` travels with the request from `Worker._predict` through `MethodRunner` to the model's
`ModelBatcher` and, for a distributed model, to the batch on the Agents. Each holder registers what
cancelling means for it: a queued instance's future is cancelled (it never runs), a running Qwen row is
told to the output rank, which finishes it at the next decode step. Python stages are not interrupted;
the next stage simply does not start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class CancelToken:
    """Thread-safe, one-way: once cancelled, every registered callback has run exactly once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], object]] = []
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` when the token is cancelled (now, if it already is)."""
        with self._lock:
            if not self.cancelled:
                self._callbacks.append(callback)
                return
        callback()
