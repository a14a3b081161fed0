"""Wire format shared by every socket of the framework: msgpack headers plus raw buffer frames.

A message is a ZMQ multipart ``[kind, header, buf0, buf1, ...]``:

* ``kind`` — one byte naming the message type (`Kind`); control and data messages are distinct kinds;
* ``header`` — a msgpack map (``{"v": PROTOCOL_VERSION, ...}``), no Python objects;
* ``bufN`` — raw C-order tensor buffers, sent as their own frames without copying.

A value (one input or output of one instance) is a numpy array, a ``str`` or ``bytes``.
In a header a value is a descriptor: ``{"t": "nd", "dtype": "float32", "shape": [2, 2], "buf": 0}``,
``{"t": "str", "v": "text"}`` or ``{"t": "bytes", "buf": 1}``. Nothing is ever pickled.

Between a co-located ZMQ Client and the Workers a large tensor may instead lie in shared memory: ``{"t": "shm",
"seg": name, "off": offset, "dtype": ..., "shape": [...]}`` (`servable_framework.shm`). Main carries it as a
`ShmTensor` value without touching the bytes; a decoder is told what to do with one (``shm``: the Worker maps
it, the Client copies its output out); without that it is refused.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import msgpack
import numpy as np

from servable_framework.errors import InvalidInput, ServingError
from servable_framework.shm import REFUSED, ShmTensor, parse_tensor

PROTOCOL_VERSION = 1

Value = Union[np.ndarray, str, bytes, ShmTensor]
Instance = dict[str, Value]
Frame = Union[bytes, memoryview]
# what a decoder does with a shared-memory tensor (map it, copy it out, or keep the reference)
ShmReader = Callable[[ShmTensor], Value]
# where an encoder may place a large array instead of a frame: its descriptor, or None (send it inline)
ShmPlacer = Callable[[np.ndarray, str], Union[dict[str, Any], None]]

# dtype names on the wire; MindSpore's REST/gRPC type set (bfloat16 travels as its raw bits).
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name)
    for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64",
    )
}


class Kind(bytes, enum.Enum):
    """One byte per message type. Control plane first, then data plane."""

    # control plane
    REGISTER = b"R"  # worker -> main, agent -> distributed worker: "I am up, here is my spec"
    FAILED = b"F"  # a child reports a start or runtime failure (carries the error text)
    PING = b"H"  # heartbeat request
    PONG = b"h"  # heartbeat answer
    EXIT = b"X"  # "stop now" (parent -> child) or "I am stopping" (child -> parent)
    CONFIG = b"C"  # agent startup -> distributed worker: ask for / answer with the agent config
    LOCAL = b"L"  # ZMQ client -> main: where is your local (unix socket) front end? main -> client: its path
    # data plane
    PREDICT = b"P"  # a request (or a batch) to run
    RESULT = b"r"  # its answer
    CANCEL = b"K"  # main -> worker -> output rank: the caller gave up on this request (rows of this batch)
    STREAM = b"s"  # output rank -> worker -> main -> ZMQ client: new outputs of streaming instances, ahead of RESULT


_KINDS = {k.value: k for k in Kind}
WIRE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # dtype -> wire name (``dtype.name`` is slow)


def encode_value(value: Value, buffers: list[Frame], place: ShmPlacer | None = None) -> dict[str, Any]:
    """Describe ``value`` in a header, appending its raw buffer (if any) to ``buffers``; ``place``: may put a
    large array in shared memory instead (`servable_framework.shm.ReplyWriter.place`)."""
    if isinstance(value, str):
        return {"t": "str", "v": value}
    if isinstance(value, (bytes, bytearray, memoryview)):
        buffers.append(bytes(value))
        return {"t": "bytes", "buf": len(buffers) - 1}
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        name = WIRE_NAMES.get(value.dtype)
        if name is None:
            if value.dtype.name not in DTYPES:
                raise InvalidInput(f"Unknown data type {value.dtype}")
            name = value.dtype.name  # a non-native byte order: copied below into a native one
            value = value.astype(DTYPES[name])
        arr = value if value.flags.c_contiguous else value.copy(order="C")  # keeps 0-d arrays 0-d
        if place is not None:
            placed = place(arr, name)
            if placed is not None:
                return placed
        buffers.append(arr.reshape(-1).view(np.uint8).data if arr.size else b"")  # .data: memoryview of the array
        return {"t": "nd", "dtype": name, "shape": list(arr.shape), "buf": len(buffers) - 1}
    if isinstance(value, ShmTensor):
        return value.descriptor()
    raise InvalidInput(f"Not support value type {type(value)}")


def decode_value(desc: Any, buffers: Sequence[Frame], shm: ShmReader | None = None) -> Value:
    """Inverse of `encode_value`. Raises `InvalidInput` on any malformed descriptor, and on a shared-memory
    tensor when ``shm`` is None."""
    if not isinstance(desc, dict):
        raise InvalidInput("malformed tensor descriptor: not a map")
    kind = desc.get("t")
    if kind == "str":
        text = desc.get("v")
        if not isinstance(text, str):
            raise InvalidInput("malformed string descriptor")
        return text
    if kind == "shm":
        if shm is None:
            raise InvalidInput(f"{REFUSED}: shared memory tensors are not accepted here; send the tensors inline")
        return shm(parse_tensor(desc, DTYPES))
    buf = _buffer(desc, buffers)
    if kind == "bytes":
        return bytes(buf)
    if kind != "nd":
        raise InvalidInput(f"malformed tensor descriptor: unknown kind {kind!r}")
    dtype = DTYPES.get(desc.get("dtype"))  # type: ignore[arg-type]
    shape = desc.get("shape")
    if dtype is None:
        raise InvalidInput(f"Unknown data type {desc.get('dtype')!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInput(f"malformed tensor shape {shape!r}")
    count = math.prod(shape)  # Python ints: a huge declared shape cannot overflow into a small size
    if count * dtype.itemsize != len(buf):
        raise InvalidInput(f"Tensor check failed: input data size {len(buf)} invalid")
    # frombuffer is zero-copy; the array is read-only, stages that mutate must copy.
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _buffer(desc: dict[str, Any], buffers: Sequence[Frame]) -> memoryview:
    index = desc.get("buf")
    if not isinstance(index, int) or not 0 <= index < len(buffers):
        raise InvalidInput("malformed tensor descriptor: bad buffer index")
    return memoryview(buffers[index])


def encode_instances(instances: Sequence[Instance], buffers: list[Frame],
                     place: ShmPlacer | None = None) -> list[dict[str, Any]]:
    return [{name: encode_value(v, buffers, place) for name, v in inst.items()} for inst in instances]


def check_instance_count(instances: Sequence[Instance], limit: int | None = None) -> None:
    """A request's instance count, as Main's admission and a Worker check it: at least one, at most ``limit``
    (None: no limit). Raises `InvalidInput` with MindSpore's texts."""
    if not instances:
        raise InvalidInput("Instances count of request cannot be 0")
    if limit is not None and len(instances) > limit:
        raise InvalidInput(f"Instances count {len(instances)} of request exceeds the limit {limit}")


def check_required_inputs(instances: Sequence[Instance], required: Sequence[str], servable: str, method: str) -> None:
    """Every instance holds every ``required`` input (first missing one, in order, raises `InvalidInput`)."""
    for inst in instances:
        for name in required:
            if name not in inst:
                raise InvalidInput(f"Cannot find input {name} in instance input , servable {servable}, "
                                   f"method {method}")


def decode_instances(raw: Any, buffers: Sequence[Frame], shm: ShmReader | None = None) -> list[Instance]:
    if not isinstance(raw, list):
        raise InvalidInput("malformed request: 'instances' must be a list")
    out: list[Instance] = []
    for item in raw:
        if not isinstance(item, dict) or not all(isinstance(k, str) for k in item):
            raise InvalidInput("instance should be a map")
        out.append({k: decode_value(v, buffers, shm) for k, v in item.items()})
    return out


def pack(kind: Kind, header: dict[str, Any], buffers: Sequence[Frame] = ()) -> list[Frame]:
    """Build the frames of one message."""
    return [kind.value, msgpack.packb({"v": PROTOCOL_VERSION, **header}, use_bin_type=True), *buffers]


def unpack(frames: Sequence[Frame]) -> tuple[Kind, dict[str, Any], Sequence[Frame]]:
    """Split frames into (kind, header, buffers). Raises `InvalidInput` on anything malformed."""
    if len(frames) < 2:
        raise InvalidInput("malformed message: expected at least 2 frames")
    kind = _KINDS.get(bytes(frames[0]))  # a dict lookup: Kind(...) costs an enum call per message
    if kind is None:
        raise InvalidInput(f"malformed message: unknown kind {bytes(frames[0])[:8]!r}")
    try:
        header = msgpack.unpackb(frames[1], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidInput(f"malformed message header: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInput("malformed message header: not a map")
    if header.get("v") != PROTOCOL_VERSION:
        raise InvalidInput(f"protocol version mismatch: got {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    return kind, header, frames[2:]


# -- a ZMQ Client's RESULT ---------------------------------------------------------------------------------------
# MindSpore's status codes of the errors (gRPC's numbering); any other error is 1
ZMQ_STATUS_CODES = {"InvalidInput": 2, "NotFound": 5, "Unavailable": 5, "Overloaded": 4, "PayloadTooLarge": 8,
                    "RequestTimeout": 4}


def error_entry(exc: ServingError) -> dict[str, Any]:
    """One ``error_msg`` entry of a ZMQ Client's RESULT."""
    return {"code": ZMQ_STATUS_CODES.get(type(exc).__name__, 1), "kind": type(exc).__name__, "msg": exc.message}


def encode_reply(results: Sequence[Instance | ServingError]) -> tuple[dict[str, Any], list[Frame]]:
    """A ZMQ Client's RESULT header (all but its ``"id"``) and buffers for one result per instance, with
    MindSpore's three-way error semantics (contract §9): ``{"instances": [...], "error_msg": []}`` when all are
    ok; ``{"error_msg": [entry]}`` alone when every instance failed with the same message (the request failed);
    else one entry per instance, ``code`` 0 for an instance that is ok (its outputs under ``instances``, ``{}``
    for a failed one). An output that cannot be encoded fails its own instance. Main renders it
    (`servable_framework.main.zmq_frontend`), and so does a Worker for a request Main forwarded undecoded."""
    buffers: list[Frame] = []
    done: list[Instance | ServingError] = []
    encoded: list[dict[str, Any]] = []
    for res in results:
        if not isinstance(res, ServingError):
            mark = len(buffers)
            try:
                encoded.append({k: encode_value(v, buffers) for k, v in res.items()})
                done.append(res)
                continue
            except ServingError as exc:
                del buffers[mark:]
                res = exc
        encoded.append({})
        done.append(res)
    errors = [r for r in done if isinstance(r, ServingError)]
    if errors and len(errors) == len(done) and len({e.message for e in errors}) == 1:
        return {"error_msg": [error_entry(errors[0])]}, []
    entries = [error_entry(r) if isinstance(r, ServingError) else {"code": 0, "kind": "", "msg": ""} for r in done]
    return {"instances": encoded, "error_msg": entries if errors else []}, buffers
