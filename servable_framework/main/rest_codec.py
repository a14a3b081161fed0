"""REST codec: MindSpore Serving's URL, request-body and reply rules (contract §8.1-8.5), pure functions.

No sockets here: the REST app checks the method and the body size, then calls `parse_url`, `parse_body`,
and later `encode_results` / `encode_error`. Every error raised is `errors.InvalidInput` whose message
keeps MindSpore's text; body errors of §8.2-8.4 carry the prefix ``"Parser request failed, "``.

Decisions where the contract is silent (MindSpore behaviour in brackets):

* URL: parsed by path segments, pairs ``model/{name}`` and ``version/{n}`` in any order, then ``:{method}``
  (everything after the first ``:``, verbatim, like MindSpore). A query string / fragment is dropped, an
  absolute URL's scheme and host are skipped, each name is percent-decoded, empty segments are ignored.
  Any other segment is an `InvalidInput` ("unexpected path segment") [ignored by substring matching].
  All URL errors are `InvalidInput` (HTTP 400), never `NotFound`: MindSpore reports them as request errors
  with the §8.1 text; unknown servables/methods are the dispatcher's 404.
* Version: only ``[+-]?digits`` is a number [``std::stol`` accepted ``"1abc"`` as 1].
* JSON: ``NaN``/``Infinity`` literals are rejected as illegal JSON (strict JSON, as nlohmann did). A UTF-8
  BOM is accepted. Duplicate keys: the last one wins, except that a repeated top-level ``instances`` is
  counted ("... but actually 2 times"). Nesting deeper than Python's parser allows is
  "Illegal JSON format. nesting too deep"; arrays with more than `MAX_DIMS` dims are rejected.
* Numbers: ints outside int32 and floats that overflow float32 (including ``1e400``) are rejected
  ("json value ... is out of int32/float32 range") [MindSpore silently truncated].
* Strings: a one-string array (shape [1]) becomes a plain ``str`` (our value model has no shaped
  strings; the dispatcher accepts [] and [1] alike). A string/bytes value of rank > 1 (``[["a"]]``, or a
  b64 ``str`` object with shape ``[1, 1]``) parses but then fails with §8.6's
  "Instances input {x} check failed, ..." text, after the whole body parsed (as MindSpore's order is).
  Strings holding lone surrogates (``"\\ud800"``) and b64 ``str`` values that are not UTF-8 are rejected.
* b64 objects inside arrays get the same key checks as top-level ones and are always base64-decoded
  [MindSpore skipped the checks and did not decode ``type: str`` there]. Shape dims must be <= 2**31-1.
  ``bool`` buffers are normalised (any non-zero byte is True). Decoded numeric arrays are read-only views.
* Messages quoting user text (a b64 string, a type name, a shape) are cut to `QUOTE_LIMIT` characters.
* Replies: float32 is encoded with ``tolist()`` (the exact float32 value as a double, which MindSpore also
  printed); NaN/±inf become ``null`` (as nlohmann did). An output that cannot be encoded makes its
  instance fail with "Failed to construct the response: ...".
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import numpy as np
import orjson

from servable_framework.errors import InvalidInput, ServingError
from servable_framework.wire import Instance, Value

PARSE_PREFIX = "Parser request failed, "
VERSION_LIMIT = 4294967295  # exclusive: MindSpore rejects version >= UINT32_MAX
MAX_DIMS = 32  # most dims of one tensor (numpy's historic limit)
QUOTE_LIMIT = 200  # longest user text quoted in an error message
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# §8.4 type names; str/bytes have no numpy dtype.
TEXT_TYPES = ("str", "bytes")
NUMERIC_TYPES: dict[str, np.dtype[Any]] = {
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "fp16": np.dtype(np.float16),
    "float16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
    "float32": np.dtype(np.float32),
    "fp64": np.dtype(np.float64),
    "float64": np.dtype(np.float64),
    "bool": np.dtype(np.bool_),
}
B64_KEYS = ("b64", "type", "shape")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_JSON_SCALARS = (bool, int, float, str)
_ENCODABLE_FLOATS = frozenset(np.dtype(name) for name in ("float16", "float32", "float64"))  # dtypes, not
# names: ``dtype.name`` is computed in Python on every read (19 of the 45 us a 2x2 output took to encode)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class RestTarget:
    """What a REST URL addresses: ``/model/{servable}[/version/{version}]:{method}``."""

    servable: str
    method: str
    version: int  # 0 = newest


# ---------------------------------------------------------------------------------------------- URL


def parse_url(path: str) -> RestTarget:
    """Parse a request path (§8.1); raise `InvalidInput` with MindSpore's "please check url, ..." texts.

    Checks in MindSpore's order: the ``model`` pair, unexpected segments, the version, the method.
    """
    path = _SCHEME.sub("", path, count=1).split("?", 1)[0].split("#", 1)[0]
    head, _, method = path.partition(":")
    fields, unexpected = _path_fields(head)
    servable = fields.get("model", "")
    if not servable:
        raise InvalidInput("please check url, the keyword:[model] must contain.")
    if unexpected is not None:
        raise InvalidInput(
            f"please check url, unexpected path segment '{_quote(unexpected)}', "
            "expected /model/{servable}[/version/{number}]:{method}"
        )
    version = _parse_version(fields["version"]) if "version" in fields else 0
    method = unquote(method)
    if not method:
        raise InvalidInput("please check url, the keyword:[service method] must contain.")
    return RestTarget(servable=servable, method=method, version=version)


def _path_fields(head: str) -> tuple[dict[str, str], str | None]:
    """Split ``/model/a/version/1`` into ``{"model": "a", "version": "1"}`` plus the first unexpected segment.

    A keyword without a following segment maps to ``""``; a repeated keyword counts as unexpected.
    """
    segments = [s for s in head.split("/") if s]
    fields: dict[str, str] = {}
    unexpected: str | None = None
    i = 0
    while i < len(segments):
        key = segments[i]
        if key in ("model", "version") and key not in fields:
            fields[key] = unquote(segments[i + 1]) if i + 1 < len(segments) else ""
            i += 2
            continue
        if unexpected is None:
            unexpected = unquote(key)
        i += 1
    return fields, unexpected


def _parse_version(text: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise InvalidInput(f"please check url, the keyword:[version] value invalid, request version number {text}")
    try:
        version = int(text)
    except ValueError:  # more digits than Python converts: certainly out of range
        version = -1
    if not 0 <= version < VERSION_LIMIT:
        raise InvalidInput(f"please check url, version number range failed, request version number {text}")
    return version


# --------------------------------------------------------------------------------------------- body


class _JsonObject(dict[str, Any]):
    """A parsed JSON object that remembers how often the key ``instances`` occurred in the text."""

    __slots__ = ("instances_count",)

    instances_count: int


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) == len(pairs):
        obj.instances_count = int("instances" in obj)
    else:  # duplicate keys collapsed: count the real occurrences
        obj.instances_count = sum(1 for key, _ in pairs if key == "instances")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_error(text: str) -> InvalidInput:
    return InvalidInput(PARSE_PREFIX + text)


def _quote(text: str) -> str:
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."


def _dump(value: Any) -> str:
    """Compact JSON of user data for an error message (nlohmann's ``dump()``), cut to `QUOTE_LIMIT`."""
    try:
        return _quote(json.dumps(value, separators=(",", ":")))
    except (RecursionError, ValueError):
        return "[...]"


def parse_body(body: bytes) -> list[Instance]:
    """Parse a REST request body (§8.1-8.4) into instances; raise only `InvalidInput`.

    ``{"instances": [{name: value}, ...]}`` or ``{"instances": {name: value}}``. JSON ints become int32
    0-d arrays, floats float32, bools bool, strings ``str``; nested arrays become int32/float32/bool arrays
    shaped by their nesting; ``{"b64": ..., "type": ..., "shape": ...}`` objects become numpy arrays
    (little-endian, C order) or ``str``/``bytes``; a one-string array becomes its ``str``.
    The body size limit is the caller's job.
    """
    if not body:
        raise InvalidInput("http message invalid")
    document = _load_json(body)
    deferred: list[str] = []  # §8.6 shape errors, reported only if the whole body parses
    instances = [_parse_instance(raw, deferred) for raw in _checked_instances(document)]
    if deferred:
        raise InvalidInput(deferred[0])
    return instances


# `_load_json`'s fast parser: orjson (about 9x faster than `json` on a 60 KB tensor body), used only where its
# answer is provably the one `json` would give; anything else, and every error, goes to `json` for its texts.
_DIGIT_RUNS = bytes(0x30 if 0x30 <= i <= 0x39 else i if i == 0x2E else 0x20 for i in range(256))  # 0 . and space
# 19 digits in a row, not right after a decimal point: maybe an int beyond int64, which orjson turns into a float
# (a fraction's digits are a float's for both parsers, and float32 values printed in full have 17-20 of them)
_LONG_NUMBER = b"0" * 19
_FAST_BRACKETS = 512  # a bound on the nesting depth, far below where `json` gives up


def _long_int_digits(body: bytes) -> bool:
    """Whether ``body`` holds 19 digits in a row that do not follow a decimal point (bytes.find, no regex:
    a lookbehind regex took 4 ms on a 200 KB body)."""
    runs = body.translate(_DIGIT_RUNS)
    at = runs.find(_LONG_NUMBER)
    while at >= 0:  # the leftmost match starts a run of digits
        if at == 0 or runs[at - 1] != 0x2E:
            return True
        end = at + len(_LONG_NUMBER)
        while end < len(runs) and runs[end] == 0x30:
            end += 1
        at = runs.find(_LONG_NUMBER, end)
    return False


def _load_fast(body: bytes) -> Any:
    """orjson's parse of ``body`` when it is certainly `json`'s, else None. Not for: a ``\\u`` escape
    (it may spell a second "instances" key or a lone surrogate), "instances" twice, 19 digits in a row, more
    than `_FAST_BRACKETS` brackets (orjson nests deeper than `json` under Python's recursion limit, whose
    "nesting too deep" text must stay); bodies orjson refuses (BOM, NaN, 1e400, bad UTF-8, ...) are `json`'s to
    refuse or accept. (The backslash is looked for alone first: a tensor body has none, and that search is a
    memchr, 3 us on 62 KB, where the two-byte one took 73.)"""
    if ((b"\\" in body and b"\\u" in body) or body.count(b'"instances"') > 1
            or body.count(b"[") + body.count(b"{") > _FAST_BRACKETS or _long_int_digits(body)):
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(document, dict):  # duplicate keys: the last one wins, as in `json`; "instances" is not one
        wrapped = _JsonObject(document)
        wrapped.instances_count = int("instances" in document)
        return wrapped
    return document


def _load_json(body: bytes) -> Any:
    fast = _load_fast(body)
    if fast is not None:
        return fast
    try:
        text = bytes(body).decode("utf-8-sig")
        return json.loads(text, object_pairs_hook=_object_from_pairs, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidInput("Illegal JSON format. nesting too deep") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit, NaN/Infinity
        raise InvalidInput(f"Illegal JSON format. {exc}") from None


def _checked_instances(document: Any) -> list[Any]:
    """The raw instance list of §8.2 (single-object form wrapped); items are checked while parsing."""
    count = document.instances_count if isinstance(document, _JsonObject) else 0
    if count != 1:
        raise _parse_error(f"key 'instances' expects to exist once, but actually {count} times")
    instances = document["instances"]
    if isinstance(instances, dict):
        if not instances:
            raise _parse_error("json object, value is empty")
        return [instances]
    if not isinstance(instances, list):
        raise _parse_error("instances no key mode is not supported")
    if not instances:
        raise _parse_error("instances value is array type, but no value")
    if not isinstance(instances[0], dict):
        raise _parse_error("instances no key mode is not supported")
    return instances


def _parse_instance(raw: Any, deferred: list[str]) -> Instance:
    if not isinstance(raw, dict):
        raise _parse_error("json array, instance is not object type")
    if not raw:
        raise _parse_error("json array, instance is object type, but no value")
    instance: Instance = {}
    for name, value in raw.items():
        if not name:
            raise _parse_error("string key is empty")
        _check_text(name)
        instance[name] = _parse_value(name, value, deferred)
    return instance


def _parse_value(name: str, value: Any, deferred: list[str]) -> Value:
    if isinstance(value, dict):
        parsed, shape = _parse_b64_object(value)
        _check_text_rank(name, parsed, shape, deferred)
        return parsed
    if isinstance(value, list):
        return _parse_array(name, value, deferred)
    return _parse_scalar(value)


def _parse_scalar(value: Any) -> Value:
    if value is None:
        raise _parse_error("json value is null, it is not supported")
    if isinstance(value, bool):
        return np.array(value, dtype=np.bool_)
    if isinstance(value, int):
        return _to_int32([value], [])
    if isinstance(value, float):
        return _to_float32([value], [])
    if isinstance(value, str):
        _check_text(value)
        return value
    raise _parse_error("json value type is unregistered")


def _check_text(text: str) -> None:
    """Reject strings that cannot be UTF-8 encoded (lone surrogates from ``\\udXXX`` escapes)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _parse_error("json string is not valid UTF-8, it holds a lone surrogate") from None


def _check_text_rank(name: str, value: Value, shape: list[int], deferred: list[str]) -> None:
    """Defer §8.6's error for a string/bytes value whose shape is neither [] nor [1]."""
    if isinstance(value, (str, bytes)) and len(shape) > 1:
        deferred.append(
            f"Instances input {name} check failed, detail: Instance tensor check failed: bytes or string type "
            f"input  shape can only be (1,) or empty, but given shape is {shape}"
        )


# ------------------------------------------------------------------------------------------- arrays


def _parse_array(name: str, value: list[Any], deferred: list[str]) -> Value:
    """§8.3 array rules, in MindSpore's order: shape, data type, one-item rule, element walk."""
    shape, first = _array_shape(value)
    kind = _leaf_kind(first)
    if kind is None:
        raise _parse_error("json array, data type is unknown")
    if kind in TEXT_TYPES:
        if math.prod(shape) != 1:
            raise _parse_error("json array, string or bytes type only support one item")
        text = _parse_b64_object(first)[0] if isinstance(first, dict) else first
        if isinstance(text, str):
            _check_text(text)
        _check_text_rank(name, text, shape, deferred)
        return text
    if isinstance(first, dict):
        raise _parse_error("json array, item is object type, object only support string or bytes type")
    rows = _flatten(value, shape, type(first))
    if kind == "bool":
        return np.array(rows, dtype=np.bool_).reshape(shape)
    if kind == "int":
        return _to_int32(rows, shape)
    return _to_float32(rows, shape)


def _array_shape(value: list[Any]) -> tuple[list[int], Any]:
    """Shape from the first element at each depth (iterative: deep nesting cannot overflow the stack)."""
    shape: list[int] = []
    node: Any = value
    while isinstance(node, list) and node:
        shape.append(len(node))
        if len(shape) > MAX_DIMS:
            raise _parse_error(f"json array, the number of dims is more than {MAX_DIMS}")
        node = node[0]
    if not shape:
        raise _parse_error("json array, shape is empty")
    return shape, node


def _leaf_kind(leaf: Any) -> str | None:
    """``bool``/``int``/``float``/``str``, the §8.4 type name of a b64 object, or None when unknown."""
    if isinstance(leaf, dict):
        type_name = leaf.get("type", "bytes")
        if isinstance(type_name, str) and (type_name in TEXT_TYPES or type_name in NUMERIC_TYPES):
            return type_name
        return None
    if isinstance(leaf, bool):
        return "bool"
    if isinstance(leaf, int):
        return "int"
    if isinstance(leaf, float):
        return "float"
    if isinstance(leaf, str):
        return "str"
    return None


def _flatten(value: list[Any], shape: list[int], leaf_type: type) -> list[Any]:
    """Depth-first walk checking every row against ``shape`` and every leaf against ``leaf_type``; the rows of
    the last dimension, in order (numpy builds the array from them in one C call)."""
    rows: list[Any] = []
    last = len(shape) - 1
    if last == 0:  # a vector: `_array_shape` measured it
        rows = [value]
    elif last == 1 and all(isinstance(row, list) and len(row) == shape[1] for row in value):  # a matrix
        rows = value
    stack: list[tuple[Any, int]] = [] if rows else [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, list):
            raise _parse_error("invalid json array: json type is not array")
        if len(node) != shape[depth]:
            raise _parse_error(
                f"invalid json array: json size is {len(node)}, the dim {depth} expected to be {shape[depth]}"
            )
        if depth == last:
            rows.append(node)
        else:
            stack.extend((child, depth + 1) for child in reversed(node))
    # every leaf's type in one C-level pass over all rows (per row: 128 set builds for a 128x96 tensor); a
    # mismatch is then found row by row, in order, for the text
    if set(map(type, itertools.chain.from_iterable(rows))) - {leaf_type}:
        for row in rows:
            _check_row(row, leaf_type)
    return rows


def _check_row(row: list[Any], leaf_type: type) -> None:
    for item in row:
        if type(item) is leaf_type:
            continue
        if type(item) in _JSON_SCALARS:
            raise _parse_error("json array, elements type is not equal")
        raise _parse_error("json array, data should be number, bool, string or bytes")


def _leaves(rows: list[Any]) -> list[Any]:
    """Every leaf of ``rows`` (lists of leaves, or leaves), in order."""
    return list(itertools.chain.from_iterable(r if isinstance(r, list) else [r] for r in rows))


def _to_int32(rows: list[Any], shape: list[int]) -> np.ndarray:
    """``rows`` (the last dimension's lists, or one bare int) as an int32 array of ``shape``."""
    try:
        wide: np.ndarray | None = np.array(rows, dtype=np.int64)
    except OverflowError:  # beyond int64
        wide = None
    if wide is None or wide.min() < INT32_MIN or wide.max() > INT32_MAX:
        bad = next(v for v in _leaves(rows) if not INT32_MIN <= v <= INT32_MAX)
        raise _parse_error(f"json value {_quote(str(bad))} is out of int32 range [{INT32_MIN}, {INT32_MAX}]")
    return wide.astype(np.int32).reshape(shape)


def _to_float32(rows: list[Any], shape: list[int]) -> np.ndarray:
    """``rows`` (the last dimension's lists, or one bare float) as a float32 array of ``shape``."""
    wide = np.array(rows, dtype=np.float64)
    # within float32's range (a NaN fails both tests): the cast is exact or rounds to a finite value
    if np.minimum.reduce(wide, axis=None) >= -_FLOAT32_MAX and np.maximum.reduce(wide, axis=None) <= _FLOAT32_MAX:
        return wide.astype(np.float32).reshape(shape)
    with np.errstate(over="ignore"):
        narrow = wide.astype(np.float32)
    finite = np.isfinite(narrow)
    if not finite.all():
        bad = _leaves(rows)[int(np.argmin(finite))]
        raise _parse_error(f"json value {bad!r} is out of float32 range")
    return narrow.reshape(shape)


# --------------------------------------------------------------------------------------- b64 objects


def _parse_b64_object(obj: dict[str, Any]) -> tuple[Value, list[int]]:
    """A §8.4 ``{"b64", "type", "shape"}`` object -> (value, declared shape)."""
    type_name, shape = _check_b64_keys(obj)
    count = math.prod(shape)
    if type_name in TEXT_TYPES and count != 1:
        raise _parse_error(
            "json object, only support scalar when data type is string or bytes, please check 'type' or 'shape'"
        )
    raw = _decode_b64(obj["b64"])
    if type_name == "bytes":
        return raw, shape
    if type_name == "str":
        return _utf8(raw), shape
    return _numeric_from_buffer(raw, type_name, shape, count), shape


def _check_b64_keys(obj: dict[str, Any]) -> tuple[str, list[int]]:
    """Key checks in nlohmann's key order (sorted); returns (type name, shape) with their defaults."""
    if not obj:
        raise _parse_error("json object, value is empty")
    if len(obj) > len(B64_KEYS):
        raise _parse_error("json object, items size is more than 3, only support specified ['b64', 'type', 'shape']")
    type_name, shape = "bytes", []
    for key in sorted(obj):
        if key == "type":
            type_name = _check_type_name(obj[key])
        elif key == "shape":
            shape = _check_shape(obj[key])
        elif key != "b64":
            raise _parse_error(f"json object, key is not ['b64', 'type', 'shape'], fail key:{_quote(key)}")
    if "b64" not in obj:
        raise _parse_error("json object, 'b64' should be specified only one time")
    return type_name, shape


def _check_type_name(value: Any) -> str:
    if not isinstance(value, str):
        raise _parse_error("json object, key is 'type', value should be string type")
    if value not in TEXT_TYPES and value not in NUMERIC_TYPES:
        raise _parse_error(f"json object, specified type:'{_quote(value)}' is illegal")
    return value


def _check_shape(value: Any) -> list[int]:
    """Non-negative int dims; a 0 dim may only be the last one (``[0]``, ``[1,0]`` ok; ``[0,0]`` not)."""
    if not isinstance(value, list):
        raise _parse_error("json object, key is 'shape', value should be array type")
    if len(value) > MAX_DIMS:
        raise _parse_error(f"json object, key is 'shape', the number of dims is more than {MAX_DIMS}")
    zero_before = False
    for dim in value:
        if zero_before:
            raise _parse_error(f"json object, key is 'shape', invalid shape value {_dump(value)}")
        if type(dim) is not int or dim < 0:
            raise _parse_error("json object, key is 'shape', array value should be unsigned integer")
        if dim > INT32_MAX:
            raise _parse_error(f"json object, key is 'shape', dim value is more than {INT32_MAX}: {_dump(value)}")
        zero_before = dim == 0
    return list(value)


def _decode_b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise _parse_error("get scalar data failed, type is string, but json is not string type")
    if len(value) % 4 or not _B64.fullmatch(value):
        raise _parse_error(f"'{_quote(value)}' is illegal b64 encode string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _parse_error(f"'{_quote(value)}' is illegal b64 encode string") from None


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _parse_error("json object, 'b64' value of type 'str' is not valid UTF-8") from None


def _numeric_from_buffer(raw: bytes, type_name: str, shape: list[int], count: int) -> np.ndarray:
    """Little-endian C-order buffer -> native array of ``shape``; byte size must match exactly."""
    dtype = NUMERIC_TYPES[type_name]
    if len(raw) != dtype.itemsize * count:
        raise _parse_error(
            f"size is not matched, decode base64 size:{len(raw)}; Given info: type:{dtype.name}; "
            f"type size:{dtype.itemsize}; element nums:{count}"
        )
    if dtype == np.bool_:
        flat = np.frombuffer(raw, dtype=np.uint8) != 0
    else:
        flat = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    try:
        return flat.reshape(shape)
    except ValueError:  # zero-size with huge leading dims: numpy's size arithmetic overflows
        raise _parse_error(f"json object, key is 'shape', invalid shape value {_dump(shape)}") from None


# ------------------------------------------------------------------------------------------- replies


def encode_results(results: Sequence[Instance | ServingError]) -> dict[str, Any]:
    """Build the §8.5 reply body from one result per request instance, in order.

    Success entries are ``{output: json_value}``; a failed instance is ``{"error_msg": text}``. When every
    instance failed with the same message the reply is the whole-request ``{"error_msg": text}``.
    """
    entries = [_encode_entry(result) for result in results]
    messages = {message for _, message in entries}
    if entries and None not in messages and len(messages) == 1:
        return {"error_msg": messages.pop()}
    return {"instances": [{"error_msg": message} if message is not None else body for body, message in entries]}


def render_results(results: Sequence[Instance | ServingError]) -> tuple[int, bytes]:
    """The whole REST answer to a predict: (HTTP status, JSON body bytes), as Main sends it and as a Worker
    renders it for a forwarded body (`servable_framework.main.rest.PredictPath`). 200 with `encode_results`'
    body rendered by orjson (the same JSON as ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))``,
    Starlette's rendering, about 14x faster for tensor outputs: 2,048 float32 1.15 -> 0.08 ms; what orjson
    cannot render, an int beyond 64 bits or a lone surrogate, goes to `json`); when every instance failed the
    same way, the whole-request error body with the first error's status."""
    body = encode_results(results)
    if "instances" not in body:
        first = next(r for r in results if isinstance(r, ServingError))
        return first.http_status, render_json(body)
    try:
        return 200, orjson.dumps(body)
    except (TypeError, orjson.JSONEncodeError):
        return 200, render_json(body)


def render_json(content: Any) -> bytes:
    """``content`` as Starlette's `JSONResponse` renders it (UTF-8, no spaces, no NaN)."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def encode_outputs(outputs: Instance) -> dict[str, Any]:
    """One instance's outputs as JSON values, as in a reply's ``instances``. Raises `ServingError` for a value
    that has no JSON form."""
    return {name: _encode_value(name, value) for name, value in outputs.items()}


def encode_error(err: ServingError) -> dict[str, Any]:
    """The whole-request error body ``{"error_msg": text}``."""
    return {"error_msg": err.message}


def _encode_entry(result: Instance | ServingError) -> tuple[dict[str, Any], str | None]:
    """(encoded outputs, None) or ({}, error text) for one instance."""
    if isinstance(result, ServingError):
        return {}, result.message
    try:
        return {name: _encode_value(name, value) for name, value in result.items()}, None
    except ServingError as exc:
        return {}, exc.message


def _encode_value(name: str, value: Any) -> Any:
    """str -> string, bytes -> ``{"b64": ...}``, numeric shape [] -> number/bool, else nested lists."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.ndarray, np.generic)):
        return _encode_array(name, np.asarray(value))
    raise ServingError(f"Failed to construct the response: output {name} has unsupported type {type(value).__name__}")


def _encode_array(name: str, array: np.ndarray) -> Any:
    if array.dtype.kind in "biu":
        return array.tolist()
    if array.dtype in _ENCODABLE_FLOATS:
        finite = np.isfinite(array)
        if np.logical_and.reduce(finite, axis=None):  # (the ufunc: ``ndarray.all`` goes through a Python wrapper)
            return array.tolist()  # float16/float32 widen exactly to Python floats
        boxed = array.astype(object)
        boxed[~finite] = None  # JSON has no NaN/Infinity: null, as nlohmann writes them
        return boxed.tolist()
    if array.dtype.kind in "US" and array.ndim <= 1 and array.size == 1:
        item = _encode_value(name, array.reshape(-1)[0].item())
        return item if array.ndim == 0 else [item]
    raise ServingError(
        f"Failed to construct the response: output {name} has unsupported data type {array.dtype} "
        f"with shape {list(array.shape)}"
    )
