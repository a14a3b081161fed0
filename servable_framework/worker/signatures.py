"""What a servable's methods say about their inputs and outputs, for protocol metadata (KServe v2).

A method's declaration knows names (``input_names``, ``output_names``) and which inputs are optional
(``defaults``); datatypes and shapes are known only where a value is a local model's input or output as it
is (a method input passed straight to a model, an output returned straight from one): then they are the
program's own (a ``torch.export`` program records them; a dynamic dim is ``-1``; a batched model's batch dim
is not part of an instance). An optional input with a str/bytes/bool/int/float default is typed by its
default. Anything else is unknown (``dtype`` and ``shape`` None). Sent to Main in the Worker's REGISTER.

One entry per method::

    {"inputs": [{"name", "dtype", "shape", "optional"}], "outputs": [{"name", "dtype", "shape"}]}

``dtype`` is a numpy dtype name, ``"str"``, ``"bytes"``, or None; ``shape`` a list of ints (-1 = any size), or
None. Best effort: a failure to read a model's metadata leaves its values unknown, never fails the Worker.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from servable_framework.servable.spec import MethodSpec, ModelSpec, ServableSpec

log = logging.getLogger(__name__)

TensorInfo = tuple[str | None, list[int] | None]  # (dtype, shape)
UNKNOWN: TensorInfo = (None, None)


def method_signatures(spec: ServableSpec, backends: Mapping[str, object]) -> dict[str, dict[str, Any]]:
    """Signatures of every method of ``spec``; ``backends`` maps a model key to its loaded backend (a
    `LocalModel` gives its program's inputs and outputs; anything else, e.g. Agents, gives nothing)."""
    io = {key: _model_io(backend) for key, backend in backends.items()}
    out: dict[str, dict[str, Any]] = {}
    for name, method in spec.methods.items():
        try:
            out[name] = _method_signature(method, io)
        except Exception:  # best effort: Main then knows the method's required inputs only
            log.exception("no signature for method %s", name)
    return out


def _method_signature(method: MethodSpec, io: Mapping[str, tuple[list[TensorInfo], list[TensorInfo]]]
                      ) -> dict[str, Any]:
    known: dict[int, TensorInfo] = {}  # method input index -> what the model it feeds says
    for stage in method.stages:
        if stage.model is None:
            continue
        model_inputs = _unbatched(stage.model, io.get(stage.model.key, ([], []))[0], inputs=True)
        for position, tensor in enumerate(stage.inputs):
            if tensor.stage == 0 and position < len(model_inputs) and tensor.index not in known:
                known[tensor.index] = model_inputs[position]
    inputs = []
    for index, name in enumerate(method.input_names):
        dtype, shape = known.get(index) or _from_default(method.defaults.get(name))
        inputs.append({"name": name, "dtype": dtype, "shape": shape, "optional": name in method.defaults})
    outputs = []
    for name, tensor in zip(method.output_names, method.returns):
        if tensor.stage == 0:
            dtype, shape = known.get(tensor.index, UNKNOWN)
        else:
            stage = method.stages[tensor.stage - 1]
            dtype, shape = UNKNOWN
            if stage.model is not None:
                model_outputs = _unbatched(stage.model, io.get(stage.model.key, ([], []))[1], inputs=False)
                if tensor.index < len(model_outputs):
                    dtype, shape = model_outputs[tensor.index]
        outputs.append({"name": name, "dtype": dtype, "shape": shape})
    return {"inputs": inputs, "outputs": outputs}


def _unbatched(model: ModelSpec, infos: list[TensorInfo], inputs: bool) -> list[TensorInfo]:
    """One instance's view: a batched model's batch dim (dim 0) is not part of an instance."""
    if not model.with_batch_dim:
        return infos
    out: list[TensorInfo] = []
    for i, (dtype, shape) in enumerate(infos):
        batched = not (inputs and i in model.without_batch_dim_inputs)
        out.append((dtype, shape[1:] if batched and shape else shape))
    return out


def _from_default(default: object) -> TensorInfo:
    if isinstance(default, str):
        return "str", [1]
    if isinstance(default, bytes):
        return "bytes", [1]
    if isinstance(default, (bool, int, float)):
        return np.asarray(default).dtype.name, []
    return UNKNOWN


def _model_io(backend: object) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """(inputs, outputs) of a local model: inputs from `LocalModel.inputs`, outputs from its program's graph."""
    inputs: list[TensorInfo] = []
    for info in getattr(backend, "inputs", None) or []:
        dtype = getattr(info, "dtype", None)
        shape = getattr(info, "shape", None)
        inputs.append((np.dtype(dtype).name if dtype is not None else None,
                       [-1 if d is None else int(d) for d in shape] if shape is not None else None))
    try:
        outputs = _graph_outputs(getattr(backend, "module", None))
    except Exception:  # metadata is best effort: an unusual graph leaves the outputs unknown
        outputs = []
    return inputs, outputs


def _graph_outputs(module: object) -> list[TensorInfo]:
    graph = getattr(module, "graph", None)
    nodes = getattr(graph, "nodes", None)
    if nodes is None:  # a Python module (SafeTensors format): nothing recorded
        return []
    out_node = next((n for n in nodes if n.op == "output"), None)
    if out_node is None or not out_node.args:
        return []
    values = out_node.args[0]
    values = values if isinstance(values, (tuple, list)) else [values]
    return [_fake_tensor_info(getattr(v, "meta", {}).get("val")) for v in values]


def _fake_tensor_info(val: object) -> TensorInfo:
    dtype = getattr(val, "dtype", None)
    shape: Sequence[object] | None = getattr(val, "shape", None)
    if dtype is None or shape is None:
        return UNKNOWN
    try:
        name = np.dtype(str(dtype).removeprefix("torch.")).name
    except TypeError:  # bfloat16 and other dtypes numpy lacks
        name = str(dtype).removeprefix("torch.")
    return name, [d if isinstance(d, int) else -1 for d in shape]
