"""Unit tests of `servable_framework.main.rest_codec` against contract §8.1-8.5 (error fragments verbatim).

Expected values are built by hand (literal lists, ``struct``, explicit little-endian ``tobytes``), never by
calling the code under test.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servable_framework.errors import InvalidInput, NotFound, ServingError, Unavailable
from servable_framework.main.rest_codec import (
    RestTarget,
    encode_error,
    encode_results,
    parse_body,
    parse_url,
)

PREFIX = "Parser request failed, "


def request(instances: Any) -> bytes:
    return json.dumps({"instances": instances}).encode()


def one(value: Any) -> bytes:
    """A body with one instance holding one input ``x``."""
    return request([{"x": value}])


def parse_x(value: Any) -> Any:
    instances = parse_body(one(value))
    assert len(instances) == 1 and list(instances[0]) == ["x"]
    return instances[0]["x"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_fails(body: bytes, fragment: str) -> str:
    with pytest.raises(InvalidInput) as info:
        parse_body(body)
    assert fragment in info.value.message, info.value.message
    return info.value.message


def assert_parse_fails(body: bytes, fragment: str) -> None:
    """A §8.2-8.4 error: fragment present and the message starts with the parse prefix."""
    message = assert_fails(body, fragment)
    assert message.startswith(PREFIX), message


def assert_array(value: Any, expected: np.ndarray) -> None:
    assert isinstance(value, np.ndarray)
    assert value.dtype == expected.dtype
    assert value.shape == expected.shape
    np.testing.assert_array_equal(value, expected)


# ---------------------------------------------------------------------------------------- §8.1 URL


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/model/add:add_common", RestTarget("add", "add_common", 0)),
        ("/model/add/version/1:add_common", RestTarget("add", "add_common", 1)),
        ("/version/0/model/add:add_common", RestTarget("add", "add_common", 0)),
        ("/version/7/model/add:add_common", RestTarget("add", "add_common", 7)),
        ("/model/add/version/4294967294:m", RestTarget("add", "m", 4294967294)),
        # contract §12 quirk 4: names holding the keywords still work
        ("/model/model:predict", RestTarget("model", "predict", 0)),
        ("/model/version/version/2:predict", RestTarget("version", "predict", 2)),
        ("/model/my_version_model/version/3:add_common", RestTarget("my_version_model", "add_common", 3)),
        ("/model/modelversion:version", RestTarget("modelversion", "version", 0)),
        # method is everything after the first ':'
        ("/model/add:a:b", RestTarget("add", "a:b", 0)),
        ("/model/add:add_common?x=1", RestTarget("add", "add_common", 0)),
        ("http://127.0.0.1:5500/model/add/version/2:add_common", RestTarget("add", "add_common", 2)),
        ("/model/my%20net:run", RestTarget("my net", "run", 0)),
        ("//model//add:m", RestTarget("add", "m", 0)),
    ],
)
def test_parse_url_valid(path: str, expected: RestTarget) -> None:
    assert parse_url(path) == expected


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/add:add_common", "please check url, the keyword:[model] must contain."),
        ("/", "please check url, the keyword:[model] must contain."),
        ("/model:add_common", "please check url, the keyword:[model] must contain."),
        ("/model/:add_common", "please check url, the keyword:[model] must contain."),
        ("/version/1:add_common", "please check url, the keyword:[model] must contain."),
        ("/model/add", "please check url, the keyword:[service method] must contain."),
        ("/model/add:", "please check url, the keyword:[service method] must contain."),
        ("/model/add/version/1", "please check url, the keyword:[service method] must contain."),
        (
            "/model/add/version/abc:m",
            "please check url, the keyword:[version] value invalid, request version number abc",
        ),
        ("/model/add/version/1x:m", "please check url, the keyword:[version] value invalid, request version number 1x"),
        ("/model/add/version:m", "please check url, the keyword:[version] value invalid, request version number "),
        ("/model/add/version/-1:m", "please check url, version number range failed, request version number -1"),
        (
            "/model/add/version/4294967295:m",
            "please check url, version number range failed, request version number 4294967295",
        ),
        (
            "/model/add/version/99999999999999999999999:m",
            "please check url, version number range failed, request version number 99999999999999999999999",
        ),
        ("/api/model/add:m", "unexpected path segment 'api'"),
        ("/model/add/extra:m", "unexpected path segment 'extra'"),
        ("/model/a/model/b:m", "unexpected path segment 'model'"),
    ],
)
def test_parse_url_errors(path: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_url(path)
    assert fragment in info.value.message
    assert not isinstance(info.value, NotFound)


def test_parse_url_model_error_comes_before_version_error() -> None:
    with pytest.raises(InvalidInput, match=r"keyword:\[model\] must contain"):
        parse_url("/version/abc:m")


# --------------------------------------------------------------------------------------- §8.1 body


def test_empty_body() -> None:
    message = assert_fails(b"", "http message invalid")
    assert not message.startswith(PREFIX)


@pytest.mark.parametrize(
    "body",
    [b"x", b"{", b'{"instances": [}', b"\xff\xfe", b"   ", b'{"instances": NaN}', b'{"instances": [{"x": Infinity}]}'],
)
def test_illegal_json(body: bytes) -> None:
    message = assert_fails(body, "Illegal JSON format.")
    assert len(message) > len("Illegal JSON format.")  # parser detail appended
    assert not message.startswith(PREFIX)


def test_utf8_bom_is_accepted() -> None:
    assert parse_body(b"\xef\xbb\xbf" + one(1))[0]["x"].dtype == np.int32


@pytest.mark.parametrize("depth", [1000, 10000, 100000])
def test_deep_nesting_is_a_clear_error(depth: int) -> None:
    body = b'{"instances": [{"x": ' + b"[" * depth + b"1" + b"]" * depth + b"}]}"
    with pytest.raises(InvalidInput) as info:
        parse_body(body)
    assert "nesting too deep" in info.value.message or "number of dims is more than 32" in info.value.message


def test_deep_object_nesting_is_a_clear_error() -> None:
    body = b'{"instances": [{"x": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}]}"
    assert_fails(body, "nesting too deep")


def test_more_than_32_dims_rejected() -> None:
    assert_parse_fails(one(_nest(1, 33)), "json array, the number of dims is more than 32")


def test_32_dims_accepted() -> None:
    value = parse_x(_nest(1, 32))
    assert_array(value, np.ones([1] * 32, dtype=np.int32))


def _nest(leaf: Any, depth: int) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


# ----------------------------------------------------------------------------------- §8.2 instances


def test_list_of_instances() -> None:
    instances = parse_body(request([{"a": 1, "b": 2.5}, {"a": 3, "b": 4.5}]))
    assert len(instances) == 2
    assert_array(instances[0]["a"], np.array(1, dtype=np.int32))
    assert_array(instances[0]["b"], np.array(2.5, dtype=np.float32))
    assert_array(instances[1]["a"], np.array(3, dtype=np.int32))
    assert_array(instances[1]["b"], np.array(4.5, dtype=np.float32))


def test_single_instance_shorthand() -> None:
    instances = parse_body(request({"a": 1, "b": "text"}))
    assert len(instances) == 1
    assert_array(instances[0]["a"], np.array(1, dtype=np.int32))
    assert instances[0]["b"] == "text"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"instance": [{"x": 1}]}', "key 'instances' expects to exist once, but actually 0 times"),
        (b"{}", "key 'instances' expects to exist once, but actually 0 times"),
        (b"[1, 2]", "key 'instances' expects to exist once, but actually 0 times"),
        (b"1", "key 'instances' expects to exist once, but actually 0 times"),
        (b'{"instances": [{"x": 1}], "instances": [{"x": 2}]}', "expects to exist once, but actually 2 times"),
        (b'{"instances": 1}', "instances no key mode is not supported"),
        (b'{"instances": "abc"}', "instances no key mode is not supported"),
        (b'{"instances": null}', "instances no key mode is not supported"),
        (b'{"instances": [1, 2]}', "instances no key mode is not supported"),
        (b'{"instances": [[{"x": 1}]]}', "instances no key mode is not supported"),
        (b'{"instances": []}', "instances value is array type, but no value"),
        (b'{"instances": [{"x": 1}, 2]}', "json array, instance is not object type"),
        (b'{"instances": [{"x": 1}, [1]]}', "json array, instance is not object type"),
        (b'{"instances": [{}]}', "json array, instance is object type, but no value"),
        (b'{"instances": [{"x": 1}, {}]}', "json array, instance is object type, but no value"),
        (b'{"instances": {}}', "json object, value is empty"),
        (b'{"instances": [{"": 1}]}', "string key is empty"),
        (b'{"instances": {"": 1}}', "string key is empty"),
    ],
)
def test_instances_errors(body: bytes, fragment: str) -> None:
    assert_parse_fails(body, fragment)


def test_other_top_level_keys_are_ignored() -> None:
    instances = parse_body(b'{"meta": 1, "instances": {"x": 2}}')
    assert_array(instances[0]["x"], np.array(2, dtype=np.int32))


def test_earlier_instance_error_wins() -> None:
    assert_parse_fails(b'{"instances": [{"x": null}, 3]}', "json value is null, it is not supported")


def test_lone_surrogate_rejected() -> None:
    assert_parse_fails(b'{"instances": [{"x": "\\ud800"}]}', "not valid UTF-8")
    assert_parse_fails(b'{"instances": [{"\\udc00": 1}]}', "not valid UTF-8")


def test_unicode_strings_and_names() -> None:
    instances = parse_body('{"instances": [{"名字": "héllo ✓"}]}'.encode())
    assert instances == [{"名字": "héllo ✓"}]


# ---------------------------------------------------------------------------------- §8.3 value kinds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, np.array(1, dtype=np.int32)),
        (-7, np.array(-7, dtype=np.int32)),
        (2147483647, np.array(2147483647, dtype=np.int32)),
        (-2147483648, np.array(-2147483648, dtype=np.int32)),
        (1.5, np.array(1.5, dtype=np.float32)),
        (0.1, np.array(0.1, dtype=np.float32)),
        (3.4028234663852886e38, np.array(3.4028234663852886e38, dtype=np.float32)),
        (True, np.array(True, dtype=np.bool_)),
        (False, np.array(False, dtype=np.bool_)),
    ],
)
def test_scalars(value: Any, expected: np.ndarray) -> None:
    assert_array(parse_x(value), expected)


def test_float_literal_forms() -> None:
    # 1.0 and 1e2 are JSON floats (not ints), -0 is an int
    assert_array(parse_body(b'{"instances": {"x": 1.0}}')[0]["x"], np.array(1.0, dtype=np.float32))
    assert_array(parse_body(b'{"instances": {"x": 1e2}}')[0]["x"], np.array(100.0, dtype=np.float32))
    assert_array(parse_body(b'{"instances": {"x": -0}}')[0]["x"], np.array(0, dtype=np.int32))


def test_string_scalar() -> None:
    assert parse_x("hello") == "hello"
    assert parse_x("") == ""


def test_null() -> None:
    assert_parse_fails(one(None), "json value is null, it is not supported")


@pytest.mark.parametrize("value", [2147483648, -2147483649, 2**63, 2**70, -(2**80)])
def test_int_out_of_int32_range(value: int) -> None:
    assert_parse_fails(one(value), "is out of int32 range")
    assert_parse_fails(one([1, value]), "is out of int32 range")


@pytest.mark.parametrize("literal", [b"1e39", b"-1e39", b"1e400", b"-1e400"])
def test_float_out_of_float32_range(literal: bytes) -> None:
    assert_parse_fails(b'{"instances": {"x": ' + literal + b"}}", "is out of float32 range")
    assert_parse_fails(b'{"instances": {"x": [1.0, ' + literal + b"]}}", "is out of float32 range")


def test_huge_int_literal_is_an_error() -> None:
    with pytest.raises(InvalidInput):
        parse_body(b'{"instances": {"x": ' + b"9" * 5000 + b"}}")


def test_int_arrays() -> None:
    assert_array(parse_x([1, 2, 3]), np.array([1, 2, 3], dtype=np.int32))
    assert_array(parse_x([[1, 2], [3, 4], [5, 6]]), np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int32))
    assert_array(parse_x([[[7]]]), np.array([[[7]]], dtype=np.int32))


def test_float_array() -> None:
    expected = np.array([[1.5, -2.25], [0.1, 3.0]], dtype=np.float32)
    assert_array(parse_x([[1.5, -2.25], [0.1, 3.0]]), expected)


def test_bool_array() -> None:
    assert_array(parse_x([[True, False], [False, True]]), np.array([[True, False], [False, True]]))


def test_one_string_array_is_str() -> None:
    assert parse_x(["abc"]) == "abc"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([1, 1.2], "json array, elements type is not equal"),
        ([1.2, 1], "json array, elements type is not equal"),
        ([1, True], "json array, elements type is not equal"),
        ([True, 1], "json array, elements type is not equal"),
        ([1, "a"], "json array, elements type is not equal"),
        ([[1, 2], [3, 4.0]], "json array, elements type is not equal"),
        ([1, None], "json array, data should be number, bool, string or bytes"),
        ([1, {"b64": "AA=="}], "json array, data should be number, bool, string or bytes"),
        ([1, [2]], "json array, data should be number, bool, string or bytes"),
        ([[1], 2], "invalid json array: json type is not array"),
        ([[1, 2], [3]], "invalid json array: json size is 1, the dim 1 expected to be 2"),
        ([[1, 2], [3, 4, 5]], "invalid json array: json size is 3, the dim 1 expected to be 2"),
        ([[[1], [2]], [[3]]], "invalid json array: json size is 1, the dim 1 expected to be 2"),
        ([], "json array, shape is empty"),
        ([[]], "json array, data type is unknown"),
        ([None], "json array, data type is unknown"),
        (["a", "b"], "json array, string or bytes type only support one item"),
        ([["a"], ["b"]], "json array, string or bytes type only support one item"),
        ([{"b64": "AA=="}, {"b64": "AA=="}], "json array, string or bytes type only support one item"),
        (
            [{"b64": "AAAAAA==", "type": "int32"}],
            "json array, item is object type, object only support string or bytes",
        ),
        ([{"b64": "AA==", "type": "fp16"}], "json array, item is object type, object only support string or bytes"),
    ],
)
def test_array_errors(value: Any, fragment: str) -> None:
    assert_parse_fails(one(value), fragment)


def test_array_of_one_b64_bytes_or_str() -> None:
    assert parse_x([{"b64": b64(b"\x00\x01raw")}]) == b"\x00\x01raw"
    assert parse_x([{"b64": b64(b"\x00\x01raw"), "type": "bytes"}]) == b"\x00\x01raw"
    assert parse_x([{"b64": b64("文字".encode()), "type": "str"}]) == "文字"


def test_string_of_rank_two_fails_with_dispatch_text() -> None:
    message = assert_fails(one([["a"]]), "Instances input x check failed, detail: Instance tensor check failed: ")
    assert "bytes or string type input  shape can only be (1,) or empty, but given shape is [1, 1]" in message
    assert not message.startswith(PREFIX)


def test_b64_str_of_rank_two_fails_with_dispatch_text() -> None:
    value = {"b64": b64(b"ab"), "type": "str", "shape": [1, 1]}
    assert_fails(one(value), "but given shape is [1, 1]")


def test_parse_error_wins_over_deferred_rank_error() -> None:
    assert_parse_fails(request([{"x": [["a"]]}, {"x": None}]), "json value is null")


# ------------------------------------------------------------------------------------- §8.4 base64

# (type name, numpy dtype, hand-written values)
NUMERIC_CASES = [
    ("int8", "<i1", [[-128, 0, 127], [1, 2, 3]]),
    ("int16", "<i2", [[-32768, 0, 32767], [1, 2, 3]]),
    ("int32", "<i4", [[-(2**31), 0, 2**31 - 1], [1, 2, 3]]),
    ("int64", "<i8", [[-(2**63), 0, 2**63 - 1], [1, 2, 3]]),
    ("uint8", "<u1", [[0, 1, 255], [4, 5, 6]]),
    ("uint16", "<u2", [[0, 1, 65535], [4, 5, 6]]),
    ("uint32", "<u4", [[0, 1, 2**32 - 1], [4, 5, 6]]),
    ("uint64", "<u8", [[0, 1, 2**64 - 1], [4, 5, 6]]),
    ("fp16", "<f2", [[0.5, -1.0, 65504.0], [0.1, 2.0, 3.0]]),
    ("float16", "<f2", [[0.5, -1.0, 65504.0], [0.1, 2.0, 3.0]]),
    ("fp32", "<f4", [[0.5, -1.0, 3.4e38], [0.1, 2.0, 3.0]]),
    ("float32", "<f4", [[0.5, -1.0, 3.4e38], [0.1, 2.0, 3.0]]),
    ("fp64", "<f8", [[0.5, -1.0, 1e300], [0.1, 2.0, 3.0]]),
    ("float64", "<f8", [[0.5, -1.0, 1e300], [0.1, 2.0, 3.0]]),
    ("bool", "|b1", [[True, False, True], [False, False, True]]),
]


@pytest.mark.parametrize(("type_name", "dtype", "values"), NUMERIC_CASES)
def test_b64_numeric_round_trip(type_name: str, dtype: str, values: list[list[Any]]) -> None:
    little = np.array(values, dtype=dtype)
    value = parse_x({"b64": b64(little.tobytes()), "type": type_name, "shape": [2, 3]})
    assert_array(value, little.astype(little.dtype.newbyteorder("=")))


@pytest.mark.parametrize(("type_name", "dtype", "values"), NUMERIC_CASES)
def test_b64_numeric_scalar(type_name: str, dtype: str, values: list[list[Any]]) -> None:
    little = np.array(values[0][1], dtype=dtype)
    for shape in ([], None):
        obj: dict[str, Any] = {"b64": b64(little.tobytes()), "type": type_name}
        if shape is not None:
            obj["shape"] = shape
        assert_array(parse_x(obj), little.astype(little.dtype.newbyteorder("=")))


def test_b64_bytes_built_with_struct() -> None:
    """Independent of numpy: little-endian float32 and int16 buffers written with ``struct``."""
    floats = parse_x({"b64": b64(struct.pack("<4f", 1.0, -2.5, 0.25, 8.0)), "type": "fp32", "shape": [2, 2]})
    assert floats.dtype == np.float32 and floats.shape == (2, 2)
    assert floats.tolist() == [[1.0, -2.5], [0.25, 8.0]]
    shorts = parse_x({"b64": b64(struct.pack("<3h", -2, 300, 7)), "type": "int16", "shape": [3]})
    assert shorts.dtype == np.int16 and shorts.tolist() == [-2, 300, 7]


def test_b64_bool_nonzero_bytes_are_true() -> None:
    value = parse_x({"b64": b64(b"\x00\x02\xff"), "type": "bool", "shape": [3]})
    assert_array(value, np.array([False, True, True]))


@pytest.mark.parametrize("shape", [[], [1]])
def test_b64_bytes_and_str(shape: list[int]) -> None:
    raw = bytes(range(256))
    assert parse_x({"b64": b64(raw), "shape": shape}) == raw
    assert parse_x({"b64": b64(raw), "type": "bytes", "shape": shape}) == raw
    assert parse_x({"b64": b64("héllo".encode()), "type": "str", "shape": shape}) == "héllo"


def test_b64_default_type_is_bytes() -> None:
    assert parse_x({"b64": b64(b"abc")}) == b"abc"
    assert parse_x({"b64": ""}) == b""


@pytest.mark.parametrize(("shape", "dims"), [([0], (0,)), ([1, 0], (1, 0)), ([3, 2, 0], (3, 2, 0))])
@pytest.mark.parametrize("type_name", ["float32", "int64", "bool", "fp16"])
def test_b64_zero_size_shapes(shape: list[int], dims: tuple[int, ...], type_name: str) -> None:
    value = parse_x({"b64": "", "type": type_name, "shape": shape})
    assert isinstance(value, np.ndarray)
    assert value.shape == dims and value.size == 0
    assert value.dtype.name == {"fp16": "float16"}.get(type_name, type_name)


@pytest.mark.parametrize("shape", [[1, 2, 0, 1], [0, 0], [0, 1], [2, 0, 0]])
def test_b64_zero_only_last(shape: list[int]) -> None:
    compact = json.dumps(shape, separators=(",", ":"))
    assert_parse_fails(
        one({"b64": "", "type": "float32", "shape": shape}),
        f"json object, key is 'shape', invalid shape value {compact}",
    )


def test_b64_huge_dims_before_zero() -> None:
    with pytest.raises(InvalidInput):
        parse_body(one({"b64": "", "type": "float64", "shape": [2**31 - 1, 2**31 - 1, 0]}))


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({}, "json object, value is empty"),
        (
            {"b64": "", "type": "bytes", "shape": [], "extra": 1},
            "json object, items size is more than 3, only support specified ['b64', 'type', 'shape']",
        ),
        ({"b64": "", "bad": 1}, "json object, key is not ['b64', 'type', 'shape'], fail key:bad"),
        ({"type": "bytes"}, "json object, 'b64' should be specified only one time"),
        ({"shape": [1]}, "json object, 'b64' should be specified only one time"),
        ({"b64": "", "type": 1}, "json object, key is 'type', value should be string type"),
        ({"b64": "", "type": None}, "json object, key is 'type', value should be string type"),
        ({"b64": "", "type": "int128"}, "json object, specified type:'int128' is illegal"),
        ({"b64": "", "type": ""}, "json object, specified type:'' is illegal"),
        ({"b64": "", "type": "FP32"}, "json object, specified type:'FP32' is illegal"),
        ({"b64": "", "shape": 1}, "json object, key is 'shape', value should be array type"),
        ({"b64": "", "shape": "[1]"}, "json object, key is 'shape', value should be array type"),
        ({"b64": "", "shape": [[1]]}, "json object, key is 'shape', array value should be unsigned integer"),
        ({"b64": "", "shape": ["1"]}, "json object, key is 'shape', array value should be unsigned integer"),
        ({"b64": "", "shape": [1.0]}, "json object, key is 'shape', array value should be unsigned integer"),
        ({"b64": "", "shape": [-1]}, "json object, key is 'shape', array value should be unsigned integer"),
        ({"b64": "", "shape": [True]}, "json object, key is 'shape', array value should be unsigned integer"),
        ({"b64": "", "shape": [2**31]}, "json object, key is 'shape'"),
        ({"b64": "", "shape": [1] * 33}, "json object, key is 'shape', the number of dims is more than 32"),
        (
            {"b64": "", "type": "str", "shape": [2]},
            "json object, only support scalar when data type is string or bytes, please check 'type' or 'shape'",
        ),
        (
            {"b64": "", "type": "bytes", "shape": [0]},
            "json object, only support scalar when data type is string or bytes, please check 'type' or 'shape'",
        ),
        (
            {"b64": "", "shape": [1, 2]},
            "json object, only support scalar when data type is string or bytes, please check 'type' or 'shape'",
        ),
        ({"b64": 12}, "get scalar data failed, type is string, but json is not string type"),
        ({"b64": None, "type": "str"}, "get scalar data failed, type is string, but json is not string type"),
        ({"b64": ["AA=="]}, "get scalar data failed, type is string, but json is not string type"),
        ({"b64": "abc"}, "'abc' is illegal b64 encode string"),
        ({"b64": "ab!="}, "'ab!=' is illegal b64 encode string"),
        ({"b64": "A==="}, "'A===' is illegal b64 encode string"),
        ({"b64": "AA=A"}, "'AA=A' is illegal b64 encode string"),
        ({"b64": "AA==AA=="}, "'AA==AA==' is illegal b64 encode string"),
        ({"b64": "éééé"}, "'éééé' is illegal b64 encode string"),
        ({"b64": b64(b"\xff\xfe"), "type": "str"}, "not valid UTF-8"),
        (
            {"b64": b64(bytes(6)), "type": "float32", "shape": [2]},
            "size is not matched, decode base64 size:6; Given info: type:float32; type size:4; element nums:2",
        ),
        (
            {"b64": b64(bytes(4)), "type": "fp16", "shape": [3]},
            "size is not matched, decode base64 size:4; Given info: type:float16; type size:2; element nums:3",
        ),
        (
            {"b64": b64(bytes(8)), "type": "fp64", "shape": [2]},
            "size is not matched, decode base64 size:8; Given info: type:float64; type size:8; element nums:2",
        ),
        (
            {"b64": b64(bytes(1)), "type": "int32"},
            "size is not matched, decode base64 size:1; Given info: type:int32; type size:4; element nums:1",
        ),
        (
            {"b64": b64(bytes(1)), "type": "uint8", "shape": [0]},
            "size is not matched, decode base64 size:1; Given info: type:uint8; type size:1; element nums:0",
        ),
    ],
)
def test_b64_errors(value: dict[str, Any], fragment: str) -> None:
    assert_parse_fails(one(value), fragment)


def test_b64_error_quotes_are_cut() -> None:
    long_text = "a" * 10001
    message = assert_fails(one({"b64": long_text}), "is illegal b64 encode string")
    assert len(message) < 1000


# ------------------------------------------------------------------------------------- §8.5 replies


def test_encode_scalars_and_arrays() -> None:
    reply = encode_results(
        [
            {
                "i": np.array(3, dtype=np.int32),
                "f": np.array(1.5, dtype=np.float32),
                "b": np.array(True),
                "u": np.array(2**64 - 1, dtype=np.uint64),
                "m": np.array([[1, 2], [3, 4]], dtype=np.int64),
                "bl": np.array([True, False]),
                "d": np.array([0.25, -1.0], dtype=np.float64),
            }
        ]
    )
    entry = reply["instances"][0]
    assert entry == {
        "i": 3,
        "f": 1.5,
        "b": True,
        "u": 2**64 - 1,
        "m": [[1, 2], [3, 4]],
        "bl": [True, False],
        "d": [0.25, -1.0],
    }
    assert type(entry["i"]) is int and type(entry["f"]) is float and type(entry["b"]) is bool
    json.dumps(reply, allow_nan=False)


def test_encode_float32_value_is_exact() -> None:
    value = encode_results([{"y": np.array([0.1, 3.2], dtype=np.float32)}])["instances"][0]["y"]
    assert [np.float32(v) for v in value] == [np.float32(0.1), np.float32(3.2)]
    assert all(type(v) is float for v in value)


def test_encode_fp16_widened() -> None:
    value = encode_results([{"y": np.array([0.5, 0.1], dtype=np.float16)}])["instances"][0]["y"]
    assert value == [0.5, 0.0999755859375]  # 0.1 in fp16 is exactly 0.0999755859375
    assert all(type(v) is float for v in value)


def test_encode_zero_size() -> None:
    entry = encode_results([{"a": np.zeros([0], dtype=np.float32), "b": np.zeros([1, 0], dtype=np.int32)}])
    assert entry == {"instances": [{"a": [], "b": [[]]}]}


def test_encode_str_and_bytes() -> None:
    entry = encode_results([{"s": "héllo", "b": b"\x00\x01\xff", "e": b""}])["instances"][0]
    assert entry == {"s": "héllo", "b": {"b64": "AAH/"}, "e": {"b64": ""}}


def test_encode_numpy_scalar_types() -> None:
    entry = encode_results([{"a": np.float32(2.5), "b": np.int8(-3), "c": np.bool_(False), "d": np.str_("t")}])
    assert entry == {"instances": [{"a": 2.5, "b": -3, "c": False, "d": "t"}]}


def test_encode_non_finite_floats_as_null() -> None:
    entry = encode_results([{"a": np.array([1.0, math.nan, math.inf], dtype=np.float32), "b": np.float64(-math.inf)}])
    assert entry == {"instances": [{"a": [1.0, None, None], "b": None}]}
    json.dumps(entry, allow_nan=False)


def test_encode_unsupported_output_fails_that_instance() -> None:
    reply = encode_results([{"y": np.array([1 + 2j])}, {"y": np.array(1, dtype=np.int32)}])
    assert "Failed to construct the response" in reply["instances"][0]["error_msg"]
    assert reply["instances"][1] == {"y": 1}


def test_per_instance_failure_keeps_others() -> None:
    reply = encode_results([{"y": np.array(1, dtype=np.int32)}, InvalidInput("bad input"), {"y": "ok"}])
    assert reply == {"instances": [{"y": 1}, {"error_msg": "bad input"}, {"y": "ok"}]}


def test_all_failed_same_message_collapses() -> None:
    reply = encode_results([InvalidInput("same"), Unavailable("same"), ServingError("same")])
    assert reply == {"error_msg": "same"}


def test_single_failed_instance_collapses() -> None:
    assert encode_results([InvalidInput("only")]) == {"error_msg": "only"}


def test_all_failed_different_messages_do_not_collapse() -> None:
    reply = encode_results([InvalidInput("a"), InvalidInput("b")])
    assert reply == {"instances": [{"error_msg": "a"}, {"error_msg": "b"}]}


def test_output_named_error_msg_is_not_a_failure() -> None:
    reply = encode_results([{"error_msg": "x"}])
    assert reply == {"instances": [{"error_msg": "x"}]}
    assert "error_msg" not in reply


def test_encode_error() -> None:
    assert encode_error(NotFound("servable is not available")) == {"error_msg": "servable is not available"}


def test_round_trip_through_json() -> None:
    """A parsed request echoed back encodes to the JSON values that were sent."""
    sent = {"i": [[1, 2], [3, 4]], "f": [0.5, 0.25], "b": True, "s": "text"}
    instances = parse_body(request([sent]))
    reply = json.loads(json.dumps(encode_results(instances)))
    assert reply == {"instances": [sent]}


# ------------------------------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=25,
)
b64_like = st.fixed_dictionaries(
    {},
    optional={
        "b64": st.text(alphabet="AQgw+/=", max_size=12) | json_values,
        "type": st.sampled_from(["int8", "uint64", "fp16", "float32", "bool", "str", "bytes", "x"]) | json_values,
        "shape": st.lists(st.integers(-2, 4), max_size=4) | json_values,
        "other": json_values,
    },
)
fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_invalid_input(body: bytes) -> None:
    try:
        result = parse_body(body)
    except InvalidInput as exc:
        assert isinstance(exc.message, str) and exc.message
        return
    assert isinstance(result, list) and result
    for instance in result:
        for name, value in instance.items():
            assert isinstance(name, str) and name
            assert isinstance(value, (np.ndarray, str, bytes))


@fuzz
@given(st.binary(max_size=200))
def test_fuzz_bytes(body: bytes) -> None:
    _only_invalid_input(body)


@fuzz
@given(json_values)
def test_fuzz_any_json_document(document: Any) -> None:
    _only_invalid_input(json.dumps(document).encode())


@fuzz
@given(json_values)
def test_fuzz_instances_value(instances: Any) -> None:
    _only_invalid_input(request(instances))


@fuzz
@given(st.lists(st.dictionaries(st.text(max_size=4), json_values | b64_like, max_size=3), max_size=3))
def test_fuzz_instance_values(instances: list[dict[str, Any]]) -> None:
    _only_invalid_input(request(instances))


@fuzz
@given(b64_like | st.lists(b64_like, max_size=2))
def test_fuzz_b64_objects(value: Any) -> None:
    _only_invalid_input(one(value))


@fuzz
@given(st.text(max_size=60))
def test_fuzz_url(path: str) -> None:
    try:
        target = parse_url(path)
    except InvalidInput:
        return
    assert target.servable and target.method and 0 <= target.version < 4294967295
