"""Cross-request batching in front of one model (local or distributed).

Instances from concurrent requests are queued; a runner thread takes the first, then waits at most
``max_batch_delay_ms`` for more, up to the model's batch size, and runs them in one call. It never pads
with fake instances (a static-shape program pads itself in `LocalModel`). ``concurrency`` runner threads
allow several batches in flight (pipeline inference: one per stage).

Inline runs: a model whose batch size is 1 has nothing to gather, so when it is idle (nothing queued, no batch
running) an instance is run at once on the submitting thread instead of being handed to a runner thread and
back (two thread switches per request, most of a tiny model's cost). Streaming backends always queue.
`ModelBatcher.loop_safe` says when such a model is also cheap enough for the Worker to run a request on its
event loop thread (no thread switch at all): after `INLINE_WARMUP` calls in a row under `INLINE_MAX_S`; one
slower call withdraws that until the next run of fast calls, one over `INLINE_NEVER_S` for good.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from functools import partial
from typing import Protocol, cast, runtime_checkable

from servable_framework.errors import ServingError
from servable_framework.wire import Value
from servable_framework.worker.cancel import CancelToken

log = logging.getLogger(__name__)

Outputs = list[Value]

INLINE_MAX_S = 0.002  # a call this long withdraws the model from the event loop (until INLINE_WARMUP fast ones)
INLINE_WARMUP = 8
INLINE_NEVER_S = 0.05  # a call this long keeps it off the event loop for good


class PieceSink(Protocol):
    """Where the model's pieces of one streaming instance go (`BatchLink.stream`)."""

    def piece(self, outputs: Outputs, finish: str | None) -> None:
        """The model's new outputs of one step (called on the Worker's event loop: must not block)."""

    def end(self) -> None:
        """The batch that ran the instance is over: no piece follows (called after its future is set)."""


_Item = tuple[list[Value], "Future[Outputs]", "CancelToken | None", "PieceSink | None"]


class Backend(Protocol):
    batch_size: int

    def check_instance(self, values: list[Value]) -> list[Value]: ...

    def run(self, instances: list[list[Value]]) -> Sequence[Outputs | ServingError]: ...


@runtime_checkable
class StreamingBackend(Backend, Protocol):
    """A backend that answers instances as they finish and can stop a running one (distributed models)."""

    def run_streaming(self, instances: list[list[Value]], on_result: Callable[[int, Outputs | ServingError], None],
                      cancels: list[CancelToken | None],
                      pieces: list[PieceSink | None] | None = None) -> list[Outputs | ServingError]:
        """``pieces`` (a sink or None per instance) is passed only when some instance streams."""


class ModelBatcher:
    """Owns the queue and the runner threads of one model. Thread-safe ``submit``."""

    def __init__(self, backend: Backend, name: str, max_batch_delay_ms: float, concurrency: int = 1) -> None:
        self.backend = backend
        self.name = name
        self.delay_s = max_batch_delay_ms / 1000.0
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._lock = threading.Lock()  # one thread gathers at a time, so batches are formed in FIFO order
        # the model runs one batch at a time per runner thread; an inline run takes a runner's place
        # (a plain lock for one: a Semaphore is a Python-level Condition, several us per acquire and release)
        self._slots: threading.Semaphore | threading.Lock = \
            threading.Lock() if concurrency == 1 else threading.Semaphore(concurrency)
        self._streaming = isinstance(backend, StreamingBackend)  # a runtime Protocol check is slow: once
        self._inline = backend.batch_size == 1 and not self._streaming
        self._fast_runs = 0  # calls in a row shorter than INLINE_MAX_S
        self._never_on_loop = False
        self._threads = [threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True)
                         for i in range(concurrency)]
        self.batches_run = 0
        self.instances_run = 0
        self.instances_dropped = 0  # cancelled while queued: never run
        for t in self._threads:
            t.start()

    def submit(self, instances: list[list[Value]], cancel: CancelToken | None = None,
               sinks: list[PieceSink | None] | None = None) -> list[Future[Outputs]]:
        """Queue instances (validated first: a bad one fails alone); returns one future per instance.
        Cancelling ``cancel`` cancels the futures of instances still queued (they never run) and is passed on
        to a streaming backend for those already running. ``sinks`` (one per instance) receive the pieces a
        streaming backend produces for them, then ``end`` once their batch is over (only if it ran)."""
        futures: list[Future[Outputs]] = []
        for i, values in enumerate(instances):
            fut: Future[Outputs] = Future()
            try:
                checked = self.backend.check_instance(values)
            except ServingError as exc:
                fut.set_exception(exc)
            else:
                item = (checked, fut, cancel, sinks[i] if sinks is not None else None)
                if self._inline and self._queue.empty() and self._slots.acquire(blocking=False):
                    try:
                        self._run([item])
                    finally:
                        self._slots.release()
                    futures.append(fut)
                    continue
                self._queue.put(item)
                if cancel is not None:
                    cancel.on_cancel(fut.cancel)  # a no-op once the batch runs it
            futures.append(fut)
        return futures

    def run_now(self, values: list[Value]) -> Outputs | ServingError | None:
        """One instance run on the calling thread at once, with no future, when `submit` would run it inline
        (batch size 1, idle): its outputs or its error. None when it would be queued: `submit` it then."""
        if not self._inline or not self._queue.empty() or not self._slots.acquire(blocking=False):
            return None
        try:
            try:
                checked = self.backend.check_instance(values)
            except ServingError as exc:
                return exc
            self.batches_run += 1
            self.instances_run += 1
            return self._run_plain([checked])[0]
        finally:
            self._slots.release()

    def loop_safe(self) -> bool:
        """True when a call of this model may run on the Worker's event loop now: inline-capable (see the
        module docstring), idle, and its recent calls were all short."""
        return (self._inline and not self._never_on_loop and self._fast_runs >= INLINE_WARMUP
                and self._queue.empty())

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _gather(self) -> list[_Item] | None:
        with self._lock:
            first = self._queue.get()
            if first is None:
                return None
            batch = [first]
            deadline = time.monotonic() + self.delay_s
            while len(batch) < self.backend.batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # leave the stop marker for the loop
                    break
                batch.append(item)
            return batch

    def _loop(self) -> None:
        while (batch := self._gather()) is not None:
            with self._slots:
                self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        """Run one gathered batch (its cancelled instances dropped) and resolve its futures."""
        live = [item for item in batch if item[1].set_running_or_notify_cancel()]
        self.instances_dropped += len(batch) - len(live)
        if not live:
            return
        self.batches_run += 1  # counted before any answer leaves, so a client never sees a stale count
        self.instances_run += len(live)
        values = [item[0] for item in live]
        sinks = [item[3] for item in live]
        results: Sequence[Outputs | ServingError]
        try:
            if self._streaming:  # instances that finish early are answered early
                backend = cast(StreamingBackend, self.backend)
                on_result = partial(_resolve_nth, [item[1] for item in live])
                cancels = [item[2] for item in live]
                if any(s is not None for s in sinks):
                    results = backend.run_streaming(values, on_result, cancels, pieces=sinks)
                else:
                    results = backend.run_streaming(values, on_result, cancels)
            else:
                results = self._run_plain(values)
        except ServingError as exc:
            results = [exc] * len(live)
        except Exception as exc:  # a model failure fails its batch, never the thread
            log.exception("model %s failed on a batch of %d", self.name, len(live))
            results = [ServingError(f"{type(exc).__name__}: {exc}")] * len(live)
        for item, res in zip(live, results):
            _resolve(item[1], res)
        for sink in sinks:
            if sink is not None:
                sink.end()


    def _run_plain(self, values: list[list[Value]]) -> Sequence[Outputs | ServingError]:
        """A batch through a non-streaming backend, timed for `loop_safe`; a failure fails the whole batch."""
        try:
            t0 = time.perf_counter()
            results = self.backend.run(values)
            self._timed(time.perf_counter() - t0)
            return results
        except ServingError as exc:
            return [exc] * len(values)
        except Exception as exc:  # a model failure fails its batch, never the thread
            log.exception("model %s failed on a batch of %d", self.name, len(values))
            return [ServingError(f"{type(exc).__name__}: {exc}")] * len(values)

    def _timed(self, seconds: float) -> None:
        if seconds < INLINE_MAX_S:
            self._fast_runs += 1
        else:
            self._fast_runs = 0
            self._never_on_loop = self._never_on_loop or seconds >= INLINE_NEVER_S


def _resolve_nth(futures: list[Future[Outputs]], index: int, result: Outputs | ServingError) -> None:
    _resolve(futures[index], result)


def _resolve(fut: Future[Outputs], result: Outputs | ServingError) -> None:
    """Set a future once; a second answer for it (the batch's final reply after an early one) is dropped."""
    try:
        if isinstance(result, ServingError):
            fut.set_exception(result)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass
