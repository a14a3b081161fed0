"""Run a traced method over the instances of one request (contract §3.5-3.6).

Each instance carries a table ``stage -> outputs``; stage 0 is the request's inputs. Python stages run
in the calling thread; model stages go to the model's `ModelBatcher`, which may batch them with the
instances of other requests. An instance whose stage fails stops there with its error; the others go on.

A streaming request (a method declared ``stream=True``) runs the same stages, except that at the last model
stage, when its backend streams (a distributed model), the calling thread follows each instance's pieces:
it runs the remaining stages on the model outputs so far and sends what is new (`worker.streaming`), then,
when the instance is done, runs them on the full outputs and sends the final piece with the finish reason.
"""

from __future__ import annotations

import inspect
import logging
import queue
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from servable_framework.errors import InvalidInput, NotFound, RequestTimeout, ServingError
from servable_framework.servable.spec import MethodSpec, ServableSpec, StageSpec
from servable_framework.wire import Instance, Value, check_instance_count, check_required_inputs
from servable_framework.worker.batcher import ModelBatcher, StreamingBackend
from servable_framework.worker.cancel import CancelToken
from servable_framework.worker.streaming import OutputDiff, Piece, accumulate, not_streaming
from servable_framework.worker.values import StageOutputError, split_outputs, to_stage_input

log = logging.getLogger(__name__)

Result = Instance | ServingError
StreamEmit = Callable[[list[Piece]], None]  # sends the pieces of one request to Main (called in order)
FINISH_UNKNOWN = "done"  # finish reason of an instance whose model did not stream one


def _cancelled() -> RequestTimeout:
    """The result of an instance whose request was cancelled; nobody reads it (Main already answered)."""
    return RequestTimeout("the request was cancelled: its caller timed out or hung up")


class _Slot:
    """One instance in flight: its stage outputs, or the error that stopped it."""

    def __init__(self, inputs: list[Any], index: int = 0) -> None:  # an absent optional input is its default
        self.index = index  # in the request
        self.values: dict[int, list[Value]] = {0: inputs}
        self.error: ServingError | None = None

    def args(self, stage: StageSpec) -> list[Value]:
        return [self.values[ref.stage][ref.index] for ref in stage.inputs]


class MethodRunner:
    """Executes the methods of one servable; ``batchers`` maps model key -> its batcher."""

    def __init__(self, spec: ServableSpec, batchers: dict[str, ModelBatcher]) -> None:
        self.spec = spec
        self.batchers = batchers

    def method(self, name: str) -> MethodSpec:
        method = self.spec.methods.get(name)
        if method is None:
            raise NotFound(f"Request servable({self.spec.name}) method({name}), method is not available")
        return method

    def run(self, method_name: str, instances: list[Instance], cancel: CancelToken | None = None,
            stream: StreamEmit | None = None) -> list[Result]:
        """One result per instance. Once ``cancel`` is cancelled no further stage starts and the instances
        still running end with `RequestTimeout` (nobody waits for them any more).

        With ``stream`` (the method must be declared ``stream=True``, else `InvalidInput`), each instance also
        sends, in order: pieces with what is new in its outputs, then exactly one last piece, with the rest of
        its outputs and its finish reason, or with the error that ended it. Not once cancelled."""
        method = self.method(method_name)
        if stream is not None and not method.stream:
            raise not_streaming(self.spec.name, method.name)
        self.admit(method, instances)
        return self.run_admitted(method, instances, cancel, stream)

    def admit(self, method: MethodSpec, instances: list[Instance], limit: int | None = None) -> None:
        """Admission's checks, with the contract's texts: 1 to ``limit`` instances (`check_instance_count`), each
        with every required input of ``method``."""
        check_instance_count(instances, limit)
        check_required_inputs(instances, method.required_inputs, self.spec.name, method.name)

    def run_admitted(self, method: MethodSpec, instances: list[Instance], cancel: CancelToken | None = None,
                     stream: StreamEmit | None = None) -> list[Result]:
        """`run` for instances that passed `admit` (and, with ``stream``, of a streaming method)."""
        slots = [_Slot([inst.get(name, method.defaults.get(name)) for name in method.input_names], index)
                 for index, inst in enumerate(instances)]
        streamer = _Streamer(stream, cancel) if stream is not None else None
        k_stream = self._stream_stage(method) if streamer is not None else None
        for k, stage in enumerate(method.stages, start=1):
            live = [s for s in slots if s.error is None]
            if not live:
                break
            if cancel is not None and cancel.cancelled:
                for slot in live:
                    slot.error = _cancelled()
                break
            if streamer is not None and k == k_stream:
                for slot in slots:
                    if slot.error is not None:
                        streamer.error(slot)
                streamer.flush()
                self._run_model_streaming(method, k, stage, live, cancel, streamer)
                break  # it ran the remaining stages of every instance
            if stage.model is not None:
                self._run_model(k, stage, live, cancel)
            elif stage.batch_size is None:
                for slot in live:
                    self._run_function(method, k, stage, slot)
            else:
                self._run_batched(method, k, stage, live)
        if streamer is not None:  # instances not reported yet: no streaming model stage, or failed before it
            for slot in slots:
                if slot.error is not None:
                    streamer.error(slot)
                else:
                    streamer.final(slot, self._outputs(method, slot), FINISH_UNKNOWN, OutputDiff())
            streamer.flush()
        return [s.error if s.error is not None else self._outputs(method, s) for s in slots]

    @staticmethod
    def _outputs(method: MethodSpec, slot: _Slot) -> Instance:
        return {name: slot.values[ref.stage][ref.index] for name, ref in zip(method.output_names, method.returns)}

    def _fail(self, method: MethodSpec, k: int, stage: StageSpec, exc: BaseException) -> ServingError:
        """Wrap a stage failure in MindSpore's text. The rule: a `ValueError` raised by user code means "bad
        input" and becomes `InvalidInput` (HTTP 400); a `ServingError` keeps its own kind; anything else
        (`TypeError`, `KeyError`, ... : most often the stage's own bug) is a server error (HTTP 500) and is
        logged with its traceback, since blaming the client would hide the bug from whoever runs the server."""
        text = exc.message if isinstance(exc, ServingError) else str(exc)
        cls: type[ServingError] = type(exc) if isinstance(exc, ServingError) else \
            InvalidInput if isinstance(exc, ValueError) else ServingError
        if cls is InvalidInput or isinstance(exc, ServingError):
            log.debug("stage %d of %s failed", k, method.name, exc_info=exc)
        else:
            log.error("stage %d (%s) of method %s raised %s: a bug in the stage, answered as a server error",
                      k, stage.tag, method.name, type(exc).__name__, exc_info=exc)
        return cls(f"Call {stage.tag} Failed, method: '{method.name}', stage index(begin with 1): {k}, "
                   f"error msg: {text}")

    def _run_function(self, method: MethodSpec, k: int, stage: StageSpec, slot: _Slot) -> None:
        assert stage.function is not None
        try:
            result = stage.function(*[to_stage_input(v) for v in slot.args(stage)])
            slot.values[k] = split_outputs(result, stage.outputs_count)
        except Exception as exc:  # user code: any failure belongs to this instance only
            slot.error = self._fail(method, k, stage, exc)

    def _run_batched(self, method: MethodSpec, k: int, stage: StageSpec, live: list[_Slot]) -> None:
        assert stage.function is not None and stage.batch_size is not None
        size = stage.batch_size or self._auto_batch_size(method, stage)
        for start in range(0, len(live), size):
            chunk = live[start:start + size]
            args = [tuple(to_stage_input(v) for v in s.args(stage)) for s in chunk]
            done = 0
            try:
                result: Any = stage.function(args)
                items = result if inspect.isgenerator(result) or isinstance(result, (list, tuple)) else None
                if items is None:
                    raise StageOutputError(f"a batched function must return or yield one result per instance, "
                                    f"got {type(result)}")
                for slot, item in zip(chunk, items):
                    slot.values[k] = split_outputs(item, stage.outputs_count)
                    done += 1
                if done < len(chunk):
                    raise StageOutputError(f"the function returned {done} results for {len(chunk)} instances")
            except Exception as exc:
                error = self._fail(method, k, stage, exc)
                for slot in chunk[done:]:
                    slot.error = error

    def _auto_batch_size(self, method: MethodSpec, stage: StageSpec) -> int:
        """``batch_size=0``: min model batch if the stage reads only method inputs, else max (§4.4)."""
        sizes = [self.batchers[s.model.key].backend.batch_size for s in method.stages if s.model is not None]
        if not sizes:
            return 1
        return min(sizes) if all(ref.stage == 0 for ref in stage.inputs) else max(sizes)

    def _run_model(self, k: int, stage: StageSpec, live: list[_Slot], cancel: CancelToken | None) -> None:
        assert stage.model is not None
        batcher = self.batchers[stage.model.key]
        if len(live) == 1:  # an idle batch-size-1 model runs it right here, with no future
            done = batcher.run_now(live[0].args(stage))
            if done is not None:
                self._set_model_outputs(k, stage, live[0], done)
                return
        futures: list[Future[list[Value]]] = batcher.submit([s.args(stage) for s in live], cancel)
        for slot, fut in zip(live, futures):
            self._take_model_outputs(k, stage, slot, fut)

    @classmethod
    def _take_model_outputs(cls, k: int, stage: StageSpec, slot: _Slot, fut: Future[list[Value]]) -> None:
        """Wait for the model outputs of one instance; they become ``slot.values[k]``, or its error."""
        try:
            outputs = fut.result()
        except ServingError as exc:
            slot.error = exc
            return
        except CancelledError:
            slot.error = _cancelled()
            return
        cls._set_model_outputs(k, stage, slot, outputs)

    @staticmethod
    def _set_model_outputs(k: int, stage: StageSpec, slot: _Slot, outputs: list[Value] | ServingError) -> None:
        if isinstance(outputs, ServingError):
            slot.error = outputs
            return
        if len(outputs) != stage.outputs_count:
            # a shard (distributed model) declares no outputs count: it is known only now (a program's was
            # checked when the Worker loaded it)
            assert stage.model is not None
            slot.error = ServingError(f"The outputs count {stage.outputs_count} in register_method not equal to "
                                      f"the count {len(outputs)} defined in model (model '{stage.model.key}', "
                                      f"{stage.model.registered_by})")
            return
        slot.values[k] = list(outputs)

    # -- streaming ------------------------------------------------------------------------------------------
    def _stream_stage(self, method: MethodSpec) -> int | None:
        """The stage whose pieces are followed: the last model stage, if its backend streams."""
        models = [k for k, stage in enumerate(method.stages, start=1) if stage.model is not None]
        if not models:
            return None
        model = method.stages[models[-1] - 1].model
        assert model is not None
        return models[-1] if isinstance(self.batchers[model.key].backend, StreamingBackend) else None

    def _run_tail(self, method: MethodSpec, k: int, slot: _Slot, cancel: CancelToken | None) -> None:
        """Run the stages after stage ``k`` for one instance (function stages only: ``k`` is the last model)."""
        for j, stage in enumerate(method.stages[k:], start=k + 1):
            if slot.error is not None:
                return
            if cancel is not None and cancel.cancelled:
                slot.error = _cancelled()
                return
            if stage.batch_size is None:
                self._run_function(method, j, stage, slot)
            else:
                self._run_batched(method, j, stage, [slot])

    def _partial_outputs(self, method: MethodSpec, k: int, slot: _Slot, so_far: list[Value]) -> Instance | None:
        """The method's outputs computed from the model outputs so far; None if a stage fails on them."""
        probe = _Slot([], slot.index)
        probe.values = {**slot.values, k: so_far}
        self._run_tail(method, k, probe, None)
        return None if probe.error is not None else self._outputs(method, probe)

    def _run_model_streaming(self, method: MethodSpec, k: int, stage: StageSpec, live: list[_Slot],
                             cancel: CancelToken | None, streamer: _Streamer) -> None:
        """Stage ``k`` (the streaming model) and every later stage, instance by instance, sending pieces."""
        assert stage.model is not None
        events: queue.SimpleQueue[tuple[int, str, Any]] = queue.SimpleQueue()
        futures = self.batchers[stage.model.key].submit([s.args(stage) for s in live], cancel,
                                                        [_Sink(events, n) for n in range(len(live))])
        for n, fut in enumerate(futures):
            fut.add_done_callback(partial(_put_done, events, n))
        states = [_Following() for _ in live]
        left = set(range(len(live)))
        while left:
            pending = [events.get()]
            while True:
                try:
                    pending.append(events.get_nowait())
                except queue.Empty:
                    break
            for n, what, payload in pending:  # take everything that arrived, then work once per instance
                st = states[n]
                if what == "piece" and st.finish is None:
                    outputs, finish = payload
                    st.so_far = accumulate(st.so_far, outputs)
                    st.finish, st.dirty = finish, True
                elif what == "end":
                    st.ended = True
            for n in sorted(left):
                st, slot, fut = states[n], live[n], futures[n]
                failed = fut.done() and (fut.cancelled() or fut.exception() is not None)
                if fut.done() and (st.finish is not None or st.ended or failed):
                    left.discard(n)
                    self._take_model_outputs(k, stage, slot, fut)
                    self._run_tail(method, k, slot, cancel)
                    if slot.error is not None:
                        streamer.error(slot)
                    else:
                        streamer.final(slot, self._outputs(method, slot), st.finish or FINISH_UNKNOWN, st.diff)
                elif st.dirty and st.finish is None and st.so_far is not None and not streamer.cancelled:
                    st.dirty = False
                    if len(st.so_far) == stage.outputs_count:
                        outputs = self._partial_outputs(method, k, slot, st.so_far)
                        delta = st.diff.delta(outputs, final=False) if outputs is not None else None
                        if delta is not None:
                            streamer.send(Piece(slot.index, delta))
            streamer.flush()



@dataclass
class _Following:
    """The calling thread's view of one streaming instance."""

    so_far: list[Value] | None = None  # the model outputs streamed so far, accumulated
    finish: str | None = None  # the model's finish reason, once its last piece came
    ended: bool = False  # its batch is over: no piece follows
    dirty: bool = False  # pieces came since the last partial outputs were computed
    diff: OutputDiff = field(default_factory=OutputDiff)


def _put_done(events: queue.SimpleQueue[tuple[int, str, Any]], n: int, _: Future[list[Value]]) -> None:
    events.put((n, "done", None))


class _Sink:
    """`PieceSink` of one instance: hands pieces to the calling thread (called on the Worker's event loop)."""

    def __init__(self, events: queue.SimpleQueue[tuple[int, str, Any]], n: int) -> None:
        self.events, self.n = events, n

    def piece(self, outputs: list[Value], finish: str | None) -> None:
        self.events.put((self.n, "piece", (outputs, finish)))

    def end(self) -> None:
        self.events.put((self.n, "end", None))


class _Streamer:
    """Collects the pieces of one streaming request and sends them in order; each instance's last piece once."""

    def __init__(self, emit: StreamEmit, cancel: CancelToken | None) -> None:
        self.emit, self.cancel = emit, cancel
        self.buffer: list[Piece] = []
        self.done: set[int] = set()  # instances whose last piece was sent

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.cancelled

    def send(self, piece: Piece) -> None:
        self.buffer.append(piece)

    def error(self, slot: _Slot) -> None:
        if slot.index not in self.done:
            self.done.add(slot.index)
            assert slot.error is not None
            self.buffer.append(Piece(slot.index, {}, error=slot.error))

    def final(self, slot: _Slot, outputs: Instance, finish: str, diff: OutputDiff) -> None:
        """The last piece of a successful instance (or its error, when the pieces would not add up)."""
        if slot.index in self.done:
            return
        try:
            delta = diff.delta(outputs, final=True)
        except ServingError as exc:
            slot.error = exc
            self.error(slot)
            return
        self.done.add(slot.index)
        self.buffer.append(Piece(slot.index, delta or {}, finish=finish))

    def flush(self) -> None:
        pieces, self.buffer = self.buffer, []
        if pieces and not self.cancelled:
            self.emit(pieces)
