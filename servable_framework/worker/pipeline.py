"""Run a traced method over the instances of one request (contract §3.5-3.6).

Each instance carries a table ``stage -> outputs``; stage 0 is the request's inputs. Python stages run
in the calling thread; model stages go to the model's `ModelBatcher`, which may batch them with the
instances of other requests. An instance whose stage fails stops there with its error; the others go on.
"""

from __future__ import annotations

import inspect
import logging
from concurrent.futures import CancelledError, Future
from typing import Any

from servable_framework.errors import InvalidInput, NotFound, RequestTimeout, ServingError
from servable_framework.servable.spec import MethodSpec, ServableSpec, StageSpec
from servable_framework.wire import Instance, Value
from servable_framework.worker.batcher import ModelBatcher
from servable_framework.worker.cancel import CancelToken
from servable_framework.worker.values import StageOutputError, split_outputs, to_stage_input

log = logging.getLogger(__name__)

Result = Instance | ServingError


def _cancelled() -> RequestTimeout:
    """The result of an instance whose request was cancelled; nobody reads it (Main already answered)."""
    return RequestTimeout("the request was cancelled: its caller timed out or hung up")


class _Slot:
    """One instance in flight: its stage outputs, or the error that stopped it."""

    def __init__(self, inputs: list[Value]) -> None:
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

    def run(self, method_name: str, instances: list[Instance], cancel: CancelToken | None = None) -> list[Result]:
        """One result per instance. Once ``cancel`` is cancelled no further stage starts and the instances
        still running end with `RequestTimeout` (nobody waits for them any more)."""
        method = self.method(method_name)
        if not instances:
            raise InvalidInput("Instances count of request cannot be 0")
        slots = []
        for inst in instances:
            for name in method.required_inputs:
                if name not in inst:
                    raise InvalidInput(f"Cannot find input {name} in instance input , servable {self.spec.name}, "
                                       f"method {method.name}")
            slots.append(_Slot([inst.get(name, method.defaults.get(name)) for name in method.input_names]))
        for k, stage in enumerate(method.stages, start=1):
            live = [s for s in slots if s.error is None]
            if not live:
                break
            if cancel is not None and cancel.cancelled:
                for slot in live:
                    slot.error = _cancelled()
                break
            if stage.model is not None:
                self._run_model(k, stage, live, cancel)
            elif stage.batch_size is None:
                for slot in live:
                    self._run_function(method, k, stage, slot)
            else:
                self._run_batched(method, k, stage, live)
        return [s.error if s.error is not None else
                {name: s.values[ref.stage][ref.index] for name, ref in zip(method.output_names, method.returns)}
                for s in slots]

    def _fail(self, method: MethodSpec, k: int, stage: StageSpec, exc: BaseException) -> ServingError:
        """Wrap a stage failure in MindSpore's text. ValueError/TypeError/KeyError raised by user code mean
        "bad input" by convention and become `InvalidInput` (HTTP 400); anything else is a server error."""
        text = exc.message if isinstance(exc, ServingError) else str(exc)
        log.debug("stage %d of %s failed", k, method.name, exc_info=exc)
        cls: type[ServingError] = type(exc) if isinstance(exc, ServingError) else \
            InvalidInput if isinstance(exc, (ValueError, TypeError, KeyError)) else ServingError
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
        futures: list[Future[list[Value]]] = self.batchers[stage.model.key].submit([s.args(stage) for s in live],
                                                                                  cancel)
        for slot, fut in zip(live, futures):
            try:
                outputs = fut.result()
            except ServingError as exc:
                slot.error = exc
                continue
            except CancelledError:
                slot.error = _cancelled()
                continue
            if len(outputs) != stage.outputs_count:
                slot.error = ServingError(f"The outputs count {stage.outputs_count} in register_method not equal to "
                                          f"the count {len(outputs)} defined in model")
                continue
            slot.values[k] = list(outputs)
