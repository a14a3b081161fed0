"""Local PyTorch models: load a `.pt2` program or a module + safetensors, and run a batch of instances.

Loading never uses unrestricted ``torch.load``: ``.pt2`` goes through ``torch.export.load`` and module
weights through ``safetensors.torch.load_file``. With ``with_batch_dim`` the instances are concatenated
along dim 0 at their real count (no padding) when the program's batch dim is dynamic; a program exported
with a static batch B is padded with copies of the first instance (contract §4.2) and sliced back.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from servable_framework import crypto
from servable_framework.errors import InvalidInput
from servable_framework.servable.spec import ModelSpec
from servable_framework.wire import Value

log = logging.getLogger(__name__)

DEFAULT_DYNAMIC_BATCH = 8


@dataclass(frozen=True)
class InputInfo:
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]  # None = dynamic dim


class LocalModel:
    """One loaded sub-graph of a model (file ``spec.files[subgraph]``) on one device. ``run(instances)`` is called
    by its batching thread only.

    Start-time checks (sub-graph 0, the one `add_stage` runs): the counts of inputs and outputs given to
    `add_stage` must be the loaded graph's, else loading fails with MindSpore's texts (contract §3.4) and the
    Worker does not start. A ``.pt2`` program knows both counts; a Python module (``SafeTensors``) knows its
    inputs count only when ``forward`` takes a fixed number of positional arguments, and never its outputs
    count before it runs: that one is checked at its first call.
    """

    def __init__(self, spec: ModelSpec, version_dir: str, device: torch.device, subgraph: int = 0) -> None:
        self.spec = spec
        self.device = device
        self.subgraph = subgraph
        paths = [os.path.join(version_dir, f) for f in spec.files]
        for path in paths:
            if not os.path.isfile(path):
                raise RuntimeError(f"Load model failed, servable directory: {version_dir}, model file '{path}' "
                                   f"not exist")
        try:
            self.module, self.inputs = self._load(paths[subgraph])
            self._call = _program_call(self.module)
        except Exception as exc:
            raise RuntimeError(f"Load model failed, servable directory: {version_dir}, {exc}") from exc
        self.inputs_count = len(self.inputs) if self.inputs is not None else _forward_arity(self.module)
        self.outputs_count = _graph_outputs_count(self.module) if spec.model_format == "TorchExport" else None
        self.static_batch = self._static_batch()
        self.batch_size = self._batch_size()
        # per input: its shape in one instance, and that shape's byte size when static (None: a dynamic dim)
        self._instance_shapes: list[tuple[Any, int | None]] = []
        for i, info in enumerate(self.inputs or []):
            shape = info.shape[1:] if self._has_batch_dim(i) else info.shape
            static = None not in shape
            self._instance_shapes.append((shape, math.prod(cast("tuple[int, ...]", shape)) * info.dtype.itemsize
                                          if static else None))
        if subgraph == 0:
            self._check_registered("inputs", spec.inputs_count, self.inputs_count)
            self._check_registered("outputs", spec.outputs_count, self.outputs_count)

    def _check_registered(self, what: str, registered: int | None, real: int | None) -> None:
        if registered is not None and real is not None and registered != real:
            raise RuntimeError(f"The {what} count {registered} in register_method not equal to the count {real} "
                               f"defined in model (model '{self.spec.key}', {self.spec.registered_by})")

    def _load(self, path: str) -> tuple[Any, list[InputInfo] | None]:
        if self.spec.model_format == "TorchExport":
            program = torch.export.load(crypto.model_source(path))  # decrypted in memory when encrypted
            infos = []
            for node in program.graph.nodes:
                if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
                    val = node.meta["val"]
                    shape = tuple(int(d) if isinstance(d, int) else None for d in val.shape)
                    infos.append(InputInfo(np.dtype(str(val.dtype).removeprefix("torch.")), shape))
            return _cache_input_checks(program.module().to(self.device)), infos
        assert self.spec.module_factory is not None
        module = self.spec.module_factory()
        module.load_state_dict(crypto.load_safetensors(path), strict=True)  # safetensors, maybe encrypted
        if self.spec.device_dtype:
            module = module.to(getattr(torch, self.spec.device_dtype))
        return module.to(self.device).eval(), None

    def _static_batch(self) -> int | None:
        if not self.spec.with_batch_dim or self.inputs is None:
            return None
        dims = {info.shape[0] for i, info in enumerate(self.inputs)
                if i not in self.spec.without_batch_dim_inputs and info.shape}
        if len(dims) == 1 and None not in dims:
            return int(dims.pop())  # type: ignore[arg-type]
        return None

    def _batch_size(self) -> int:
        if not self.spec.with_batch_dim:
            return 1
        if self.spec.max_batch_size:
            return min(self.spec.max_batch_size, self.static_batch or self.spec.max_batch_size)
        return self.static_batch or DEFAULT_DYNAMIC_BATCH

    def check_instance(self, values: list[Value]) -> list[Value]:
        """Per-instance validation before batching (contract §4.3); returns the values reshaped."""
        if self.inputs is None:
            return values
        if len(values) < len(self.inputs):
            raise InvalidInput(f"Given model inputs size {len(values)} less than model inputs size {len(self.inputs)}")
        out: list[Value] = []
        for i, (value, info) in enumerate(zip(values, self.inputs)):
            if not isinstance(value, np.ndarray):
                raise InvalidInput(f"Given model input {i} data type {type(value).__name__} not match the data type "
                                   f"{info.dtype.name} defined in model")
            if value.dtype != info.dtype:
                raise InvalidInput(f"Given model input {i} data type {value.dtype.name} not match the data type "
                                   f"{info.dtype.name} defined in model")
            shape, expected = self._instance_shapes[i]
            if expected is not None:
                if value.nbytes != expected:
                    raise InvalidInput(f"Given model input {i} size {value.nbytes} not match the size {expected} "
                                       f"defined in model")
                value = value.reshape(shape)  # only byte size is checked, like MindSpore (§4.2)
            out.append(value)
        return out

    def _has_batch_dim(self, index: int) -> bool:
        return self.spec.with_batch_dim and index not in self.spec.without_batch_dim_inputs

    @torch.inference_mode()
    def run(self, instances: list[list[Value]]) -> list[list[Value]]:
        """Run up to ``batch_size`` instances in one call; returns one output list per instance."""
        n = len(instances)
        if not self.spec.with_batch_dim:
            return [self._forward(inst) for inst in instances]
        pad = (self.static_batch - n) if self.static_batch else 0
        batch = []
        for i in range(len(instances[0])):
            if not self._has_batch_dim(i):
                batch.append(instances[0][i])
                continue
            parts = [np.asarray(inst[i])[None] for inst in instances] + [np.asarray(instances[0][i])[None]] * pad
            batch.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))  # (`_forward` copies)
        outputs = cast("list[np.ndarray]", self._forward(batch))  # `_forward` returns arrays only
        return [[o[j] for o in outputs] for j in range(n)]

    def _forward(self, values: list[Value]) -> list[Value]:
        args = [torch.from_numpy(np.array(v)) for v in values]
        if self.device.type != "cpu":  # (a no-op `to` still costs a call per input)
            args = [a.to(self.device) for a in args]
        result = self._call(*args)
        results = result if isinstance(result, (tuple, list)) else [result]
        if self.subgraph == 0 and self.spec.outputs_count is not None and len(results) != self.spec.outputs_count:
            # only a Python module gets here: a program's outputs count was checked at load
            raise RuntimeError(f"The outputs count {self.spec.outputs_count} in register_method not equal to the "
                               f"count {len(results)} defined in model (model '{self.spec.key}', "
                               f"{self.spec.registered_by})")
        return [r.detach().cpu().numpy() for r in results]


CHECKED_SIGNATURES = 256  # input signatures (dtypes, shapes, strides, devices) a program's input check remembers


def _cache_input_checks(module: Any) -> Any:
    """Run an exported program's input checks once per input signature instead of on every call.

    ``ExportedProgram.module()`` checks every call's inputs twice: in a forward pre-hook (pytree structure, and
    the shape constraints unless the graph has a guards function) and in its ``_guards_fn`` submodule, which
    the graph calls first (the export's shape guards). For a 2x2 ``add`` they took 57 of the 75 us a call
    took. What they check depends on the inputs' structure, dtypes, shapes, strides and devices only, so a
    signature that passed once passes again: it is remembered (up to `CHECKED_SIGNATURES`, then checked every
    time) and the checks are skipped for it. A torch without that hook or submodule is left as it is."""
    try:
        from torch.export._unlift import _check_input_constraints_pre_hook as check
    except ImportError:
        return module
    hooks = getattr(module, "_forward_pre_hooks", {})
    for key, hook in list(hooks.items()):
        if hook is check:
            hooks[key] = _RememberedCheck(check)
    guards = getattr(module, "_guards_fn", None)
    if isinstance(guards, torch.nn.Module):
        module._guards_fn = _RememberedGuards(guards)
    return module


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What an exported program's input checks depend on, for positional tensors (None: anything else)."""
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None
    return tuple((a.dtype, a.shape, a.stride(), a.device) for a in args)


class _RememberedCheck:
    """`_cache_input_checks`' stand-in for the pre-hook (same call signature: ``with_kwargs=True``)."""

    def __init__(self, check: Any) -> None:
        self.check = check
        self.passed: set[Any] = set()

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        signature = None if kwargs else _signature(args)
        if signature is None:
            return self.check(module, args, kwargs)
        if signature in self.passed:
            return None
        result = self.check(module, args, kwargs)  # raises for inputs the program does not take
        if len(self.passed) < CHECKED_SIGNATURES:
            self.passed.add(signature)
        return result


class _RememberedGuards(torch.nn.Module):
    """`_cache_input_checks`' stand-in for a program's ``_guards_fn`` submodule: the graph calls it with the
    flat inputs; a signature that passed is not checked again. (``__call__`` itself, without `torch.nn.Module`'s
    call machinery: it is called on every forward.)"""

    def __init__(self, guards: torch.nn.Module) -> None:
        super().__init__()
        self.guards = guards
        self.passed: set[Any] = set()

    def __call__(self, *args: Any) -> Any:
        signature = _signature(args)
        if signature is not None and signature in self.passed:
            return None
        result = self.guards(*args)  # raises for inputs that break a guard
        if signature is not None and len(self.passed) < CHECKED_SIGNATURES:
            self.passed.add(signature)
        return result


def _program_call(module: Any) -> Any:
    """How `LocalModel` calls ``module``: the module itself, or, for an exported program whose hooks are just
    `_RememberedCheck` and export's pair that registers ``nn.Module`` input types as pytree nodes (a no-op
    for a program whose example inputs held none), that check followed by ``forward``, without
    `torch.nn.Module`'s hook machinery (18 of the 39 us of a 2x2 ``add``). Global module hooks (someone
    debugging) send every call the long way again."""
    pre = list(getattr(module, "_forward_pre_hooks", {}).values())
    post = list(getattr(module, "_forward_hooks", {}).values())
    checks = [h for h in pre if isinstance(h, _RememberedCheck)]
    others = [h for h in pre + post if not isinstance(h, _RememberedCheck)]
    if len(checks) != 1 or not all(_noop_export_hook(h) for h in others) or \
            getattr(module, "_backward_hooks", None) or getattr(module, "_backward_pre_hooks", None):
        return module
    check = checks[0]
    from torch.nn.modules import module as nn_module

    def hooked() -> bool:
        return bool(nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks
                    or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)

    flat = _flat_program(module)
    if flat is None:
        def call(*args: Any) -> Any:
            if hooked():
                return module(*args)
            changed = check(module, args, {})
            if changed is not None:
                args = changed if isinstance(changed, tuple) else (changed,)
            return module.forward(*args)

        return call

    forward, guards, single = flat
    # this call remembers the signatures itself: the checks' own memories (`_RememberedCheck`,
    # `_RememberedGuards`) are left out, so a new signature is looked up and remembered once, not three times
    check = check.check
    if isinstance(guards, _RememberedGuards):
        guards = guards.guards
    passed: set[Any] = set()  # signatures that passed both checks

    def flat_call(*args: Any) -> Any:
        if hooked():
            return module(*args)
        signature = _signature(args)
        if signature is None or signature not in passed:
            if check(module, args, {}) is not None:  # (export's check changes nothing; a hook that does: as before)
                return module(*args)
            if guards is not None:
                guards(*args)  # raises for inputs that break a guard
            if signature is not None and len(passed) < CHECKED_SIGNATURES:
                passed.add(signature)
        out = forward(*args)
        return out[0] if single else out

    return flat_call


def _flat_program(module: Any) -> tuple[Any, Any, bool] | None:
    """(forward, guards, single) for an exported program whose inputs are positional tensors and whose output is a
    tensor or a flat tuple/list of them: ``forward`` is the program's graph taking and returning flat tensors,
    without the pytree flatten and unflatten around it and without its call of the ``_guards_fn`` submodule
    (``guards``, None when it has none), which the caller runs itself, once per input signature (together 9 of
    the 21 us of a 2x2 ``add``). ``forward`` returns a tuple also where ``module(...)`` returns one tensor
    (``single``). None for any other program, or a torch without these parts of ``torch.fx``."""
    try:
        from torch.fx.graph import _PyTreeCodeGen
        from torch.utils import _pytree as pytree

        graph = getattr(module, "graph", None)
        codegen = getattr(graph, "_codegen", None)
        if not isinstance(graph, torch.fx.Graph) or not isinstance(codegen, _PyTreeCodeGen):
            return None
        info = codegen.pytree_info
        if info.in_spec != pytree.tree_structure((tuple(range(len(info.orig_args))), {})):
            return None
        out = info.out_spec
        if out is None:
            return None
        # (``children()`` in newer torch, where ``children_specs`` warns that it is going)
        kids = out.children() if hasattr(out, "children") else out.children_specs
        if not (out.is_leaf() or (out.type in (tuple, list) and all(c.is_leaf() for c in kids))):
            return None
        new = torch.fx.Graph()
        new.output(new.graph_copy(graph, {}))  # (a Graph's own code generation: positional in, tuple out)
        for node in list(new.nodes):
            if node.op == "call_module" and node.target == "_guards_fn":
                if node.users:
                    return None
                new.erase_node(node)
        return torch.fx.GraphModule(module, new).forward, getattr(module, "_guards_fn", None), out.is_leaf()
    except Exception:  # another torch's internals: the plain call
        log.debug("exported program kept on its own forward", exc_info=True)
        return None


def _noop_export_hook(hook: Any) -> bool:
    """One of the hooks ``ExportedProgram.module()`` adds around every call to register the ``nn.Module`` types
    of its example inputs as pytree nodes, with no such type to register."""
    if not getattr(hook, "__qualname__", "").startswith("_create_stateful_graph_module."):
        return False
    cells = getattr(hook, "__closure__", None) or ()
    return all(isinstance(c.cell_contents, (set, frozenset, list, tuple)) and not c.cell_contents for c in cells)


def _graph_outputs_count(module: Any) -> int:
    """The outputs of an exported program's graph (its output node's flat values: what ``module(...)`` returns
    for a tensor or a tuple/list of tensors, the output structures `LocalModel` serves)."""
    node = next(n for n in module.graph.nodes if n.op == "output")
    values = node.args[0]
    return len(values) if isinstance(values, (tuple, list)) else 1


def _forward_arity(module: Any) -> int | None:
    """The inputs count of a Python module: ``forward``'s positional parameters, when they are all required
    (a default or ``*args`` leaves it unknown)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    fixed = all(p.default is p.empty for p in positional) and not any(p.kind is p.VAR_POSITIONAL for p in params)
    return len(positional) if fixed else None
