"""KServe v2 / Open Inference Protocol REST codec: inference request and response bodies, pure functions.

No sockets here (`servable_framework.main.kserve` owns the routes). `decode_request` turns a body (JSON, or
JSON followed by raw tensors: the binary-data extension) into one method instance; `encode_response` turns the
method's outputs into a body. Every error raised is `errors.InvalidInput` (HTTP 400) with a message that names
the tensor at fault.

Tensors (KServe datatype -> what the method gets):

* ``BOOL`` ``UINT8..UINT64`` ``INT8..INT64`` ``FP16`` ``FP32`` ``FP64`` -> a numpy array of ``shape`` with the
  matching dtype (binary: little-endian, row-major; BOOL one byte, non-zero is true). ``BF16`` is refused.
* ``BYTES`` -> one ``str`` (or ``bytes``): the servable's values hold one string each, so a BYTES tensor must
  have exactly one element (shape ``[]``, ``[1]``, ``[1, 1]``...). JSON data is a string; binary data is the
  4-byte little-endian length + bytes. Either way the element becomes ``str`` when it is UTF-8, else ``bytes``;
  ``parameters.content_type`` ``"str"`` / ``"bytes"`` on the input forces one (``"str"`` refuses non-UTF-8).
* JSON ``data`` may be flat or nested (row-major); its element count must equal the shape's. Elements must
  have the datatype's JSON type: true/false for BOOL, integers in range for the integer types (no floats, no
  truncation), numbers for FP (finite in the type's range; FP16 values must be exactly representable, since
  rounding them silently is how FP16 goes wrong: send FP16 binary to have the bits kept as they are).
* Binary (header ``Inference-Header-Content-Length`` = the JSON's byte length): each input with
  ``parameters.binary_data_size`` takes that many bytes, in the order of ``inputs``; sizes are checked before
  slicing (numeric: prod(shape) x itemsize; BYTES: the elements fill it exactly) and must add up to the body
  length minus the header length.

Outputs (a method output -> KServe tensor): a numeric numpy array keeps its dtype and shape; ``str`` /
``bytes`` (or a numpy string array) is ``BYTES`` (a single string has shape ``[1]``); a Python scalar is a 0-d
tensor. JSON ``data`` is flat row-major; non-finite floats are ``null`` in JSON (ask binary to keep them);
bytes that are not UTF-8 have no JSON form (ask binary). An output is sent binary when the request's
``outputs`` entry says ``parameters.binary_data: true``, or else when the request's
``parameters.binary_data_output`` is true (what ``tritonclient`` sends when no outputs are named).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from servable_framework.errors import InvalidInput, ServingError
from servable_framework.wire import Instance, Value

HEADER_LENGTH = "inference-header-content-length"
MAX_DIMS = 32
MAX_QUOTE = 200  # longest piece of user text quoted in an error

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
BYTES = "BYTES"
_BY_NUMPY = {dtype.name: name for name, dtype in DATATYPES.items()}
_SUPPORTED = ", ".join([*DATATYPES, BYTES])


def datatype_of(numpy_name: str | None) -> str | None:
    """The KServe datatype of a numpy dtype name (or ``"str"``/``"bytes"``); None when it has none."""
    if numpy_name in ("str", "bytes"):
        return BYTES
    return _BY_NUMPY.get(numpy_name or "")


# ---------------------------------------------------------------------------------------- request schema

Dim = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # unknown keys: ignored, as KServe's servers do


class InputTensor(_Model):
    name: StrictStr = Field(min_length=1)
    shape: list[Dim] = Field(max_length=MAX_DIMS)
    datatype: StrictStr
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestedOutput(_Model):
    name: StrictStr = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class InferenceRequest(_Model):
    id: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class _BinarySize(_Model):
    binary_data_size: Dim | None = None
    content_type: StrictStr | None = None
    shared_memory_region: Any = None


class _OutputParameters(_Model):
    binary_data: StrictBool | None = None
    shared_memory_region: Any = None


class _RequestParameters(_Model):
    binary_data_output: StrictBool = False
    timeout: Annotated[StrictInt, Field(gt=0)] | None = None  # Triton's: microseconds


# -------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool


@dataclass(frozen=True)
class DecodedRequest:
    """One inference request: its tensors as ONE method instance, and how to answer."""

    id: str | None
    instance: Instance
    outputs: list[OutputRequest] | None  # None: every output of the method
    binary_output: bool  # the default for outputs not named in ``outputs``
    timeout_s: float | None  # ``parameters.timeout`` (µs), as seconds


def decode_request(body: bytes, header_length: str | None) -> DecodedRequest:
    """Parse a ``POST .../infer`` body; ``header_length`` is the ``Inference-Header-Content-Length`` header."""
    json_part, binary = _split(body, header_length)
    try:
        document = _load_json(json_part)
    except InvalidInput as exc:
        if header_length is None and exc.message.startswith("malformed JSON"):
            raise InvalidInput(f"{exc.message} (a body with binary tensors needs the "
                               f"Inference-Header-Content-Length header)") from None
        raise
    request = _validate(InferenceRequest, document, "request")
    params = _validate(_RequestParameters, request.parameters or {}, "request parameters")
    instance: Instance = {}
    view = memoryview(binary)
    offset = 0
    for tensor in request.inputs:
        if tensor.name in instance:
            raise InvalidInput(f"input '{_quote(tensor.name)}' is given more than once")
        tensor_params = _validate(_BinarySize, tensor.parameters or {}, f"input '{_quote(tensor.name)}' parameters")
        if tensor_params.shared_memory_region is not None:
            raise InvalidInput("shared memory is not supported: send the data in the request")
        size = tensor_params.binary_data_size
        if size is None:
            instance[tensor.name] = _from_json(tensor, tensor_params.content_type)
            continue
        if tensor.data is not None:
            raise InvalidInput(f"input '{_quote(tensor.name)}' has both 'data' and binary_data_size")
        if header_length is None:
            raise InvalidInput(f"input '{_quote(tensor.name)}' has binary_data_size but the request has no "
                               f"Inference-Header-Content-Length header")
        if offset + size > len(view):
            raise InvalidInput(f"input '{_quote(tensor.name)}': binary_data_size {size} goes past the end of the "
                               f"body ({len(view) - offset} bytes of binary data left)")
        instance[tensor.name] = _from_binary(tensor, view[offset:offset + size], tensor_params.content_type)
        offset += size
    if offset != len(view):
        raise InvalidInput(f"the body holds {len(view) - offset} bytes of binary data that no input's "
                           f"binary_data_size claims")
    return DecodedRequest(request.id, instance, _outputs(request.outputs), params.binary_data_output,
                          params.timeout / 1e6 if params.timeout else None)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit() or not text.isascii():
        raise InvalidInput(f"header Inference-Header-Content-Length must be a byte count, got '{_quote(text)}'")
    length = int(text)
    if length > len(body):
        raise InvalidInput(f"header Inference-Header-Content-Length is {length} but the body has {len(body)} bytes")
    return body[:length], body[length:]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(raw: bytes) -> Any:
    if not raw:
        raise InvalidInput("the request body is empty: expected a JSON inference request")
    try:
        return json.loads(raw.decode("utf-8-sig"), parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidInput("malformed JSON: nesting too deep") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise InvalidInput(f"malformed JSON: {exc}") from None


def _validate(model: type[Any], value: Any, what: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False)[:3]:
            where = ".".join(str(part) for part in err["loc"])
            problems.append(f"{where}: {err['msg']}" if where else str(err["msg"]))
        raise InvalidInput(f"invalid {what}: {'; '.join(problems)}") from None


def _outputs(requested: list[RequestedOutput] | None) -> list[OutputRequest] | None:
    if not requested:
        return None
    out: list[OutputRequest] = []
    for item in requested:
        params = _validate(_OutputParameters, item.parameters or {}, f"output '{_quote(item.name)}' parameters")
        if params.shared_memory_region is not None:
            raise InvalidInput("shared memory is not supported: outputs come back in the response")
        if any(o.name == item.name for o in out):
            raise InvalidInput(f"output '{_quote(item.name)}' is requested more than once")
        out.append(OutputRequest(item.name, bool(params.binary_data)))
    return out


def _element_count(tensor: InputTensor) -> int:
    if tensor.datatype != BYTES and tensor.datatype not in DATATYPES:
        raise InvalidInput(f"input '{_quote(tensor.name)}': unsupported datatype '{_quote(tensor.datatype)}' "
                           f"(supported: {_SUPPORTED})")
    count = math.prod(tensor.shape)
    if tensor.datatype == BYTES and count != 1:
        raise InvalidInput(f"input '{_quote(tensor.name)}': a BYTES tensor must hold exactly one element here "
                           f"(a method value is one string), shape {tensor.shape} holds {count}")
    return count


def _from_json(tensor: InputTensor, content_type: str | None) -> Value:
    count = _element_count(tensor)
    if tensor.data is None:
        raise InvalidInput(f"input '{_quote(tensor.name)}' has no 'data' and no binary_data_size")
    leaves = _flatten(tensor.data)
    if len(leaves) != count:
        raise InvalidInput(f"input '{_quote(tensor.name)}': shape {tensor.shape} needs {count} elements, "
                           f"'data' has {len(leaves)}")
    if tensor.datatype == BYTES:
        if not isinstance(leaves[0], str):
            raise InvalidInput(f"input '{_quote(tensor.name)}': BYTES data must be a JSON string")
        _check_utf8(tensor.name, leaves[0])
        return leaves[0].encode("utf-8") if content_type == "bytes" else leaves[0]
    return _numeric(tensor, leaves)


def _flatten(data: Any) -> list[Any]:
    """Row-major leaves of nested lists (iterative: deep nesting cannot overflow the stack)."""
    if not isinstance(data, list):
        return [data]
    leaves: list[Any] = []
    stack: list[Any] = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        else:
            leaves.append(node)
    return leaves


def _numeric(tensor: InputTensor, leaves: list[Any]) -> np.ndarray:
    dtype = DATATYPES[tensor.datatype]
    name = _quote(tensor.name)
    if dtype.kind == "b":
        if not all(type(v) is bool for v in leaves):
            raise InvalidInput(f"input '{name}': BOOL data must be true/false")
        return _reshape(tensor, np.array(leaves, dtype=dtype))
    if dtype.kind in "iu":
        if not all(type(v) is int for v in leaves):
            raise InvalidInput(f"input '{name}': {tensor.datatype} data must be JSON integers")
        info = np.iinfo(dtype)
        if leaves and (min(leaves) < info.min or max(leaves) > info.max):
            bad = next(v for v in leaves if not info.min <= v <= info.max)
            raise InvalidInput(f"input '{name}': {_quote(str(bad))} is out of {tensor.datatype} range "
                               f"[{info.min}, {info.max}]")
        return _reshape(tensor, np.array(leaves, dtype=dtype))
    if not all(type(v) in (int, float) for v in leaves):
        raise InvalidInput(f"input '{name}': {tensor.datatype} data must be JSON numbers")
    try:
        wide = np.array(leaves, dtype=np.float64)
    except OverflowError:  # an integer beyond float64
        raise InvalidInput(f"input '{name}': a value is out of {tensor.datatype} range") from None
    with np.errstate(over="ignore"):
        narrow = wide.astype(dtype)
    if not np.isfinite(narrow).all():
        raise InvalidInput(f"input '{name}': a value is out of {tensor.datatype} range")
    if dtype == np.float16 and not np.array_equal(narrow.astype(np.float64), wide):
        raise InvalidInput(f"input '{name}': FP16 JSON data must be exactly representable in FP16 "
                           f"(send FP16 as binary data, or round it yourself)")
    return _reshape(tensor, narrow)


def _reshape(tensor: InputTensor, flat: np.ndarray) -> np.ndarray:
    try:
        return flat.reshape(tensor.shape)
    except ValueError:  # zero elements with dims whose product numpy cannot compute
        raise InvalidInput(f"input '{_quote(tensor.name)}': invalid shape {tensor.shape}") from None


def _from_binary(tensor: InputTensor, raw: memoryview, content_type: str | None) -> Value:
    count = _element_count(tensor)
    name = _quote(tensor.name)
    if tensor.datatype == BYTES:
        if len(raw) < 4:
            raise InvalidInput(f"input '{name}': BYTES binary data must start with a 4-byte length")
        (length,) = struct.unpack_from("<I", raw)
        if 4 + length != len(raw):
            raise InvalidInput(f"input '{name}': BYTES element of {length} bytes does not fill binary_data_size "
                               f"{len(raw)} (4-byte length + bytes, one element)")
        element = bytes(raw[4:])
        if content_type == "bytes":
            return element
        try:
            return element.decode("utf-8")
        except UnicodeDecodeError:
            if content_type == "str":
                raise InvalidInput(f"input '{name}': content_type 'str' but the bytes are not UTF-8") from None
            return element
    dtype = DATATYPES[tensor.datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"input '{name}': binary_data_size {len(raw)} does not match shape {tensor.shape} of "
                           f"{tensor.datatype} ({count * dtype.itemsize} bytes)")
    if dtype.kind == "b":
        flat: np.ndarray = np.frombuffer(raw, dtype=np.uint8) != 0
    else:
        flat = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    return _reshape(tensor, flat)


def _check_utf8(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"input '{_quote(name)}': the string holds a lone surrogate (not UTF-8)") from None


def _quote(text: str) -> str:
    return text if len(text) <= MAX_QUOTE else text[:MAX_QUOTE] + "..."


# -------------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    header_length: int | None  # the JSON's length when binary tensors follow it, else None


def encode_response(model_name: str, model_version: str | None, request_id: str | None, outputs: Instance,
                    selection: Sequence[OutputRequest] | None, binary_default: bool) -> EncodedResponse:
    """The ``.../infer`` response: the selected outputs (all, in the method's order, when ``selection`` is
    None), each as JSON data or binary."""
    if selection is None:
        selection = [OutputRequest(name, binary_default) for name in outputs]
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for item in selection:
        if item.name not in outputs:
            raise InvalidInput(f"output '{_quote(item.name)}' is not an output of this model "
                               f"(outputs: {', '.join(outputs)})")
        datatype, array = _output_array(item.name, outputs[item.name])
        tensor: dict[str, Any] = {"name": item.name, "datatype": datatype, "shape": list(array.shape)}
        if item.binary:
            raw = _binary(datatype, array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = _json_data(item.name, datatype, array)
        tensors.append(tensor)
    document: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        document["model_version"] = model_version
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = tensors
    head = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    if not chunks:
        return EncodedResponse(head, None)
    return EncodedResponse(head + b"".join(chunks), len(head))


def _output_array(name: str, value: Any) -> tuple[str, np.ndarray]:
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        element = bytes(value) if isinstance(value, (bytearray, memoryview)) else value
        array = np.empty(1, dtype=object)
        array[0] = element
        return BYTES, array
    array = np.asarray(value)
    if array.dtype.kind in "USO":
        flat = array.reshape(-1)
        for element in flat:
            if not isinstance(element, (str, bytes)):
                raise ServingError(f"Failed to construct the response: output '{_quote(name)}' holds "
                                   f"{type(element).__name__} values, which have no KServe datatype")
        return BYTES, array.astype(object)
    datatype = _BY_NUMPY.get(array.dtype.name)
    if datatype is None:
        raise ServingError(f"Failed to construct the response: output '{_quote(name)}' has data type "
                           f"{array.dtype}, which has no KServe datatype")
    return datatype, array


def _binary(datatype: str, array: np.ndarray) -> bytes:
    if datatype == BYTES:
        parts: list[bytes] = []
        for element in array.reshape(-1):
            raw = element.encode("utf-8") if isinstance(element, str) else bytes(element)
            parts.append(struct.pack("<I", len(raw)))
            parts.append(raw)
        return b"".join(parts)
    if datatype == "BOOL":
        return np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _json_data(name: str, datatype: str, array: np.ndarray) -> list[Any]:
    flat = array.reshape(-1)
    if datatype == BYTES:
        out: list[Any] = []
        for element in flat:
            if isinstance(element, str):
                out.append(element)
                continue
            try:
                out.append(bytes(element).decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidInput(f"output '{_quote(name)}' holds bytes that are not UTF-8, which JSON cannot "
                                   f"carry: request it with parameters.binary_data = true") from None
        return out
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        boxed = flat.astype(object)
        boxed[~np.isfinite(flat)] = None  # JSON has no NaN/Infinity
        return list(boxed.tolist())
    return list(flat.tolist())
