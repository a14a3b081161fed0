"""The declaration API used inside ``servable_config.py`` (contract §3).

Declarations record into a `ServableSpec` owned by the `ServableBuilder` that the loader activates
while it imports ``servable_config.py`` (a context variable, not module globals). Methods are traced
once at decoration time: the decorated function runs with `TensorDef` placeholders and every
``add_stage`` call appends a stage. Every validation failure raises RuntimeError with MindSpore's text.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from servable_framework.servable import checks, legacy
from servable_framework.servable.legacy import LegacyTrace
from servable_framework.servable.spec import (
    MODEL_FORMATS,
    DistributedSpec,
    MethodSpec,
    ModelSpec,
    ServableSpec,
    StageSpec,
    TensorDef,
)

F = TypeVar("F", bound=Callable[..., Any])

_builder: contextvars.ContextVar[ServableBuilder | None] = contextvars.ContextVar("servable_builder", default=None)


class ServableBuilder:
    """Collects the declarations of one servable while its ``servable_config.py`` is imported."""

    def __init__(self, name: str, directory: str) -> None:
        self.spec = ServableSpec(name=name, directory=directory)
        self.method: MethodSpec | None = None  # the method being traced
        self.legacy: LegacyTrace | None = None  # its call_* plan, when it uses the deprecated API
        self.handles: list[Model] = []  # the Model objects handed out, so the Worker can bind runners

    @contextmanager
    def active(self) -> Iterator[ServableBuilder]:
        token = _builder.set(self)
        try:
            yield self
        finally:
            _builder.reset(token)


def current_builder() -> ServableBuilder:
    builder = _builder.get()
    if builder is None:
        raise RuntimeError("Failed to obtain the directory of servable_config.py")
    return builder


@dataclass(frozen=True)
class GraphRunner:
    """One loaded sub-graph of a model, as the Worker binds it to the `Model` handle for ``Model.call``."""

    inputs_count: int | None  # of the loaded graph; None = not known before running it (a Python module)
    run: Callable[[list[list[Any]]], list[list[Any]]]  # instances -> one list of outputs per instance


class Model:
    """Handle returned by `declare_model` / `distributed.declare_servable`; pass it to `add_stage`.

    In a Worker, ``Model.call(...)`` runs the loaded model synchronously from inside a Python stage.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._graphs: list[GraphRunner] = []  # one per sub-graph, bound by the Worker once the model is loaded

    @property
    def model_key(self) -> str:
        return self.spec.key

    def bind(self, graphs: list[GraphRunner]) -> None:
        """Called by the Worker: ``graphs[i]`` runs sub-graph i (``spec.files[i]``)."""
        if len(graphs) != self.spec.subgraph_count:
            raise RuntimeError(f"model '{self.spec.key}' has {self.spec.subgraph_count} sub-graphs, "
                               f"{len(graphs)} bound")
        self._graphs = list(graphs)

    def call(self, *args: Any, subgraph: int = 0) -> Any:
        """Run sub-graph ``subgraph`` of the model (contract §3.2): ``call(x1, x2)`` runs one instance and returns
        its single output, or a tuple of its outputs; ``call([[x1, x2], [x3, x4]])`` runs several (batched with
        the model's other callers) and returns a list with one tuple of outputs per instance.

        Raises:
            RuntimeError: ``Model({key}).call() failed: ...`` (``Model({key}, subgraph={n})`` for n != 0) with
                MindSpore's texts: no inputs, a bad inputs format, no instances, a bad sub-graph index, an
                instance whose inputs count is not the model's, or the model's own per-instance errors (§4.3).
        """
        checks.check_int("subgraph", subgraph)
        prefix = f"Model({self.spec.key}).call() failed" if subgraph == 0 else \
            f"Model({self.spec.key}, subgraph={subgraph}).call() failed"
        if not args:
            raise RuntimeError(f"{prefix}: no inputs provided")
        single = not (len(args) == 1 and isinstance(args[0], (list, tuple)))
        instances = [list(args)] if single else list(args[0])
        if not single:
            if not all(isinstance(i, (list, tuple)) for i in instances):
                raise RuntimeError(f"{prefix}: inputs format invalid")
            if not instances:
                raise RuntimeError(f"{prefix}: Input instances count is 0")
        count = self.spec.subgraph_count
        if not 0 <= subgraph < count:
            raise RuntimeError(f"{prefix}: The model does not have subgraph of index {subgraph}, the subgraph count "
                               f"of the model is {count}")
        if not self._graphs:  # outside a Worker (at import time, in a unit test): nothing is loaded
            raise RuntimeError(f"{prefix}: the model is not declared")
        graph = self._graphs[subgraph]
        # the loaded graph's count; a Python module's is unknown, then sub-graph 0 has the add_stage count
        n = graph.inputs_count if graph.inputs_count is not None or subgraph else self.spec.inputs_count
        for i, inst in enumerate(instances):
            if n is not None and len(inst) != n:
                raise RuntimeError(f"{prefix}: The inputs count {len(inst)} of instance {i} is not equal to "
                                   f"the inputs count {n} of the model")
        try:
            results = graph.run([list(i) for i in instances])
        except RuntimeError as exc:
            raise RuntimeError(f"{prefix}: {exc}") from None
        if single:
            return results[0][0] if len(results[0]) == 1 else tuple(results[0])
        return [tuple(r) for r in results]


def declare_model(
    model_file: str | list[str] | tuple[str, ...],
    model_format: str,
    with_batch_dim: bool = True,
    options: Any = None,
    without_batch_dim_inputs: int | list[int] | None = None,
    context: Any = None,
    config_file: str | None = None,
    *,
    module_factory: Callable[[], Any] | None = None,
    max_batch_size: int = 0,
    max_batch_delay_ms: float = 0.0,
    dtype: str | None = None,
) -> Model:
    """Declare a local model of this servable (MindSpore ``register.declare_model``).

    Args:
        model_file: file name(s) inside each version directory (``{servable}/{version}/{file}``). A list is one
            model with several sub-graphs, sub-graph i = file i (MindSpore); `add_stage` runs sub-graph 0,
            ``Model.call(..., subgraph=i)`` runs sub-graph i. Every file has the same format and options.
        model_format: ``"TorchExport"`` (a ``torch.export`` ``.pt2`` program: graph + weights, no user code)
            or ``"SafeTensors"`` (``module_factory()`` builds the ``torch.nn.Module``; weights come from the
            safetensors file, loaded with ``strict=True``). Case ignored.
        with_batch_dim: dim 0 of inputs/outputs is the batch; instances of concurrent requests are batched.
        without_batch_dim_inputs: input indexes that carry no batch dim (taken from the first instance).
        options, context, config_file: accepted for MindSpore compatibility; unused.
        module_factory: zero-argument callable returning the module (``SafeTensors`` only).
        max_batch_size: most instances per model call (0 = the static batch dim of a ``.pt2`` program, else 8).
        max_batch_delay_ms: how long the first instance of a batch may wait for more (0 = take what is queued).
        dtype: optional torch dtype name to cast floating weights to (e.g. ``"float16"``).

    Raises:
        RuntimeError: with MindSpore's messages on any invalid argument or a repeated declaration.
    """
    spec = current_builder().spec
    files = checks.check_str_list("model_file", model_file)
    fmt = checks.check_str("model_format", model_format)
    canonical = {f.lower(): f for f in MODEL_FORMATS}.get(fmt.lower())
    if canonical is None:
        raise RuntimeError(f"model format can only be {' or '.join(MODEL_FORMATS)}, case ignored")
    checks.check_bool("with_batch_dim", with_batch_dim)
    no_batch = checks.check_int_list("without_batch_dim_inputs", without_batch_dim_inputs) \
        if without_batch_dim_inputs else []
    checks.check_int("max_batch_size", max_batch_size, 0)
    if canonical == "SafeTensors" and not callable(module_factory):
        raise RuntimeError("model format SafeTensors needs 'module_factory', a callable returning the torch.nn.Module")
    if spec.distributed_model is not None:
        raise RuntimeError("servable has already been declared as distributed servable")
    key = ";".join(files)
    for other in spec.models:
        if other.key == key:
            raise RuntimeError("the same model has already been declared")
        for f in files:
            if f in other.files:
                raise RuntimeError(f"model file '{f}' has already been used")
    model = ModelSpec(key=key, files=files, model_format=canonical, with_batch_dim=with_batch_dim,
                      without_batch_dim_inputs=tuple(no_batch), max_batch_size=max_batch_size,
                      max_batch_delay_ms=float(max_batch_delay_ms), module_factory=module_factory, device_dtype=dtype)
    spec.models.append(model)
    handle = Model(model)
    current_builder().handles.append(handle)
    return handle


def declare_distributed(
    rank_size: int,
    stage_size: int,
    with_batch_dim: bool,
    without_batch_dim_inputs: int | list[int] | None,
    enable_pipeline_infer: bool,
    shard: str,
    shard_options: dict[str, Any] | None,
    max_batch_size: int,
    max_batch_delay_ms: float,
    continuous_batching: bool = False,
) -> Model:
    """Implementation of `servable_framework.server.distributed.declare_servable` (documented there)."""
    spec = current_builder().spec
    checks.check_int("rank_size", rank_size, 1)
    checks.check_int("stage_size", stage_size, 1)
    checks.check_bool("with_batch_dim", with_batch_dim)
    checks.check_bool("enable_pipeline_infer", enable_pipeline_infer)
    checks.check_bool("continuous_batching", continuous_batching)
    checks.check_str("shard", shard)
    checks.check_int("max_batch_size", max_batch_size, 0)
    no_batch = checks.check_int_list("without_batch_dim_inputs", without_batch_dim_inputs) \
        if without_batch_dim_inputs else []
    if spec.distributed_model is not None:
        raise RuntimeError("servable is repeatedly been declared as distributed servable")
    if spec.models:
        raise RuntimeError("servable has already been declared as local servable")
    if rank_size % stage_size != 0:
        raise RuntimeError("Rank size must be an integral multiple of stage size")
    dist = DistributedSpec(rank_size=rank_size, stage_size=stage_size, enable_pipeline_infer=enable_pipeline_infer,
                           shard=shard, shard_options=dict(shard_options or {}),
                           continuous_batching=continuous_batching)
    model = ModelSpec(key=spec.name, files=[], model_format="Distributed", with_batch_dim=with_batch_dim,
                      without_batch_dim_inputs=tuple(no_batch),
                      max_batch_size=(max_batch_size or 8) if with_batch_dim else 1,
                      max_batch_delay_ms=float(max_batch_delay_ms), distributed=dist)
    spec.models.append(model)
    handle = Model(model)
    current_builder().handles.append(handle)
    return handle


def set_servable_options(*, request_timeout_s: float | None = None) -> None:
    """Options of the whole servable (beyond MindSpore).

    Args:
        request_timeout_s: deadline of a request to this servable (default: Main's ``request_timeout_s``,
            100 s); a request may still ask for its own (REST header ``X-Request-Timeout-S``, ZMQ ``timeout_s``).
    """
    spec = current_builder().spec
    if request_timeout_s is not None:
        if isinstance(request_timeout_s, bool) or not isinstance(request_timeout_s, (int, float)) or \
                request_timeout_s <= 0:
            raise RuntimeError("Parameter 'request_timeout_s' should be a number > 0")
        spec.request_timeout_s = float(request_timeout_s)


def add_stage(stage: Any, *args: Any, outputs_count: int, batch_size: int | None = None,
              tag: str | None = None) -> Any:
    """Add a stage to the method being traced; returns one placeholder, or a tuple of ``outputs_count``.

    ``stage`` is a `Model` (its model runs on the instances; batched across requests when it has a batch
    dim) or a Python function. A function with ``batch_size=None`` is called once per instance with the
    inputs as positional args; with ``batch_size`` (int >= 0; 0 = let the server choose) it is called with
    ONE list of per-instance input tuples and must return or yield one result per instance.
    """
    builder = current_builder()
    method = builder.method
    if method is None:
        raise RuntimeError("add_stage should be called in a function decorated by register_method")
    if not isinstance(stage, Model) and not inspect.isfunction(stage):
        raise RuntimeError(f"the parameter 'stage' of add_stage must be function or Model returned by "
                           f"declare_model, now is {type(stage)}")
    for arg in args:
        if not isinstance(arg, TensorDef):
            raise RuntimeError("Each value of parameter *args is a placeholder for data and must come from the "
                               "method inputs or the outputs of add_stage")
    checks.check_int("outputs_count", outputs_count, 1)
    if tag is not None:
        checks.check_str("tag", tag)
    spec = builder.spec
    if isinstance(stage, Model):
        if batch_size is not None:
            raise RuntimeError("Parameter 'batch_size' is only valid for a function stage")
        _record_model_io(stage.spec, len(args), outputs_count, spec,
                         f"stage {len(method.stages) + 1} of method '{method.name}'")
        st = StageSpec(inputs=list(args), outputs_count=outputs_count, model=stage.spec,
                       tag=tag or f"Model '{stage.spec.key}'")
    else:
        if batch_size is not None:
            checks.check_int("batch_size", batch_size, 0)
        _record_function_io(stage, len(args), outputs_count, batch_size is not None, method.name, spec)
        st = StageSpec(inputs=list(args), outputs_count=outputs_count, function=stage, batch_size=batch_size,
                       tag=tag or f"Function '{spec.name}.{stage.__name__}'")
    method.stages.append(st)
    index = len(method.stages)
    outs = tuple(TensorDef(index, i) for i in range(outputs_count))
    return outs[0] if outputs_count == 1 else outs


def _record_model_io(model: ModelSpec, n_in: int, n_out: int, spec: ServableSpec, where: str) -> None:
    """Every add_stage of one model must give the same counts (they are sub-graph 0's; the Worker compares them
    with the loaded model at start). ``where`` names this stage for the error."""
    if all(m is not model for m in spec.models):
        raise RuntimeError("the parameter 'stage' of add_stage must be function or Model returned by "
                           "declare_model, the model is not declared in this servable")
    for what, new, old in (("inputs", n_in, model.inputs_count), ("outputs", n_out, model.outputs_count)):
        if old is not None and new != old:
            raise RuntimeError(f"RegisterInputOutputInfo failed, {what} count {new} not match old count {old} "
                               f"(model '{model.key}': {where} gives {new}, {model.registered_by} gave {old})")
    if model.inputs_count is None:
        model.registered_by = where
    model.inputs_count, model.outputs_count = n_in, n_out


def _record_function_io(func: Callable[..., Any], n_in: int, n_out: int, batched: bool, method: str,
                        spec: ServableSpec) -> None:
    name = f"{spec.name}.{func.__name__}"
    if not batched:
        params = inspect.signature(func).parameters.values()
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
        required = sum(1 for p in positional if p.default is p.empty)
        if not varargs and not required <= n_in <= len(positional):
            raise RuntimeError(f"function {name} input args count {len(positional)} not match the count {n_in} "
                               f"registered in method")
    old = spec.functions.get(name)
    if old is not None:
        if old[2] != batched:
            raise RuntimeError("parameter 'batch_size' in multiple 'add_stage' should be enabled or disabled "
                               "consistently")
        if old[0] != n_in:
            raise RuntimeError(f"Stage function '{name}' inputs count {n_in} not match last registered count "
                               f"{old[0]}, method name '{method}'")
        if old[1] != n_out:
            raise RuntimeError(f"Stage function '{name}' outputs count {n_out} not match last registered count "
                               f"{old[1]}, method name '{method}'")
    spec.functions[name] = (n_in, n_out, batched)


STREAM_RESERVED = ("index", "finish_reason", "error_msg")  # keys of a stream event beside the output names


def register_method(output_names: str | list[str] | tuple[str, ...], stream: bool = False) -> Callable[[F], F]:
    """Decorator: register the decorated function as a method; its parameter names are the input names.

    The function body runs once now, with placeholders, to record its stages; ordinary Python control flow
    therefore runs at import time only (put data-dependent logic inside a stage function). The decorator
    returns the function unchanged.

    Beyond MindSpore: a parameter with a default (None, str, int, float or bool) is an *optional* input; a
    request may omit it and stage functions then receive the default as is.

    ``stream=True`` (beyond MindSpore) lets a client ask for the outputs piece by piece as the model produces
    them (REST ``Accept: text/event-stream``, ``Client.infer_stream``); asked for normally the method behaves as
    any other. The stages after the distributed model then run again on each instance's model outputs so far
    (arrays concatenated along axis 0) and only what is new is sent, so they must be *prefix-stable*: their
    output for a prefix of the model outputs is a prefix of their output for the whole (a str that ends with
    U+FFFD is held back until more comes: a multi-byte character split across tokens). See
    `servable_framework.worker.streaming`.
    """
    names = checks.check_str_list("output_names", output_names)
    checks.check_bool("stream", stream)
    if stream and any(n in STREAM_RESERVED for n in names):
        raise RuntimeError(f"a stream method cannot have an output named {', '.join(STREAM_RESERVED)}: "
                           f"stream events carry these keys beside the outputs")

    def deco(func: F) -> F:
        builder = current_builder()
        method = MethodSpec(name=func.__name__, input_names=_input_names(func), output_names=names,
                            defaults=_defaults(func), stream=stream)
        if method.name in builder.spec.methods:
            raise RuntimeError(f"Method {method.name} has been registered more than once.")
        builder.method = method
        builder.legacy = legacy.plan(func)
        try:
            returned = func(*[TensorDef(0, i) for i in range(len(method.input_names))])
        finally:
            builder.method = None
            builder.legacy = None
        outs = list(returned) if isinstance(returned, (tuple, list)) else [returned]
        for out in outs:
            if not isinstance(out, TensorDef):
                raise RuntimeError("Each value returned is a placeholder for data and must come from the method "
                                   "inputs or the outputs of add_stage")
        if len(outs) != len(names):
            raise RuntimeError(f"Method return output size {len(outs)} not match registered {len(names)}")
        method.returns = outs
        builder.spec.methods[method.name] = method
        return func

    return deco


def _legacy_stage(kind: str, stage: Any, args: tuple[Any, ...], batched: bool = False) -> Any:
    """The deprecated call_* API (`servable_framework.servable.legacy`): `add_stage` with the outputs count
    read from the method's source."""
    builder = current_builder()
    if builder.method is None:
        raise RuntimeError("call_* should be called in a function decorated by register_method")
    if builder.legacy is None:  # the source was not available: behave as MindSpore does without counts
        builder.legacy = legacy.LegacyTrace([])
    legacy.check_order(builder.legacy, kind)
    count = builder.legacy.next_count()
    if kind == "servable":
        models = builder.spec.models
        if not models:
            raise RuntimeError("There is no model declared, you can use declare_model to declare models")
        if len(models) > 1:
            raise RuntimeError("There are more than one servable declared when the interface 'call_servable' is used")
        handle = next(h for h in builder.handles if h.spec is models[0])
        return add_stage(handle, *args, outputs_count=count)
    tag = "Preprocess" if kind == "pre" else "Postprocess"
    return add_stage(stage, *args, outputs_count=count, batch_size=0 if batched else None, tag=tag)


def call_preprocess(preprocess_fun: Callable[..., Any], *args: Any) -> Any:
    """Deprecated (MindSpore 1.x): ``add_stage(preprocess_fun, *args, outputs_count=<from the source>)``."""
    return _legacy_stage("pre", preprocess_fun, args)


def call_preprocess_pipeline(preprocess_fun: Callable[..., Any], *args: Any) -> Any:
    """Deprecated (MindSpore 1.x): the batched form of `call_preprocess` (``batch_size=0``)."""
    return _legacy_stage("pre", preprocess_fun, args, batched=True)


def call_servable(*args: Any) -> Any:
    """Deprecated (MindSpore 1.x): ``add_stage(<the one declared model>, *args, outputs_count=<from the source>)``."""
    return _legacy_stage("servable", None, args)


def call_postprocess(postprocess_fun: Callable[..., Any], *args: Any) -> Any:
    """Deprecated (MindSpore 1.x): ``add_stage(postprocess_fun, *args, outputs_count=<from the source>)``."""
    return _legacy_stage("post", postprocess_fun, args)


def call_postprocess_pipeline(postprocess_fun: Callable[..., Any], *args: Any) -> Any:
    """Deprecated (MindSpore 1.x): the batched form of `call_postprocess` (``batch_size=0``)."""
    return _legacy_stage("post", postprocess_fun, args, batched=True)


def _defaults(func: Callable[..., Any]) -> dict[str, Any]:
    out = {}
    for p in inspect.signature(func).parameters.values():
        if p.default is p.empty:
            continue
        if p.default is not None and not isinstance(p.default, (str, int, float, bool)):
            raise RuntimeError(f"'{func.__name__}' input {p.name}: a default must be None, str, int, float or bool")
        out[p.name] = p.default
    return out


def _input_names(func: Callable[..., Any]) -> list[str]:
    names = []
    for p in inspect.signature(func).parameters.values():
        for kind, label in ((p.VAR_POSITIONAL, "VAR_POSITIONAL"), (p.VAR_KEYWORD, "VAR_KEYWORD"),
                            (p.KEYWORD_ONLY, "KEYWORD_ONLY")):
            if p.kind == kind:
                raise RuntimeError(f"'{func.__name__}' input {p.name} cannot be {label} !")
        names.append(p.name)
    return names
