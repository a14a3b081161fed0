"""Conversions at the edge of user stage functions (contract §3.6)."""

from __future__ import annotations

from typing import Any

import numpy as np

from servable_framework.wire import DTYPES, Value


class StageOutputError(RuntimeError):
    """A stage function returned something unusable: a servable bug, not bad input."""


def to_stage_input(value: Value | None) -> Any:
    """Numeric tensors as ndarray (0-d for scalars), str as str, bytes as a 1-D uint8 array; an absent
    optional input is its default, passed as is."""
    if isinstance(value, bytes):
        return np.frombuffer(value, dtype=np.uint8)
    return value


def from_stage_output(value: Any) -> Value:
    """Normalise one value returned by a stage function; raises TypeError for unsupported types."""
    if isinstance(value, np.ndarray):
        if value.dtype.name not in DTYPES:
            raise StageOutputError(f"output data type {value.dtype} is not supported")
        return value if value.flags.c_contiguous else value.copy(order="C")  # keeps 0-d arrays 0-d
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return np.array(bool(value))
    if isinstance(value, int):
        return np.array(value, dtype=np.int64)
    if isinstance(value, float):
        return np.array(value, dtype=np.float64)
    if isinstance(value, np.generic):
        return from_stage_output(np.asarray(value))
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch here
        return from_stage_output(value.detach().cpu().numpy())
    if hasattr(value, "asnumpy"):
        return from_stage_output(value.asnumpy())
    raise StageOutputError(f"output type {type(value)} is not supported, expected numpy array, str, bytes, bool, int, "
                    f"float or torch.Tensor")


def split_outputs(result: Any, count: int) -> list[Value]:
    """A function result -> exactly ``count`` normalised values (a bare value when count == 1)."""
    if count == 1 and not (isinstance(result, (tuple, list)) and len(result) == 1):
        return [from_stage_output(result)]
    if not isinstance(result, (tuple, list)):
        raise StageOutputError(f"the function returned {type(result)}, expected {count} outputs")
    if len(result) != count:
        raise StageOutputError(f"the function returned {len(result)} outputs, expected {count}")
    return [from_stage_output(v) for v in result]
