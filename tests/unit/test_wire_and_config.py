"""Pure logic: wire framing, rank tables, addresses, start configs, settings."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servable_framework.errors import InvalidInput
from servable_framework.rank_table import check_against_declaration, parse_rank_table
from servable_framework.server.start_config import ServableStartConfig
from servable_framework.settings import Settings
from servable_framework.transport import parse_address
from servable_framework.wire import PROTOCOL_VERSION, Kind, decode_instances, encode_instances, pack, unpack


def roundtrip(instances):
    buffers: list = []
    header = encode_instances(instances, buffers)
    frames = pack(Kind.PREDICT, {"instances": header}, buffers)
    kind, head, bufs = unpack([bytes(f) for f in frames])
    assert kind is Kind.PREDICT
    return decode_instances(head["instances"], bufs)


def test_tensors_travel_as_raw_frames_not_pickle() -> None:
    x = np.arange(6, dtype=np.float16).reshape(2, 3)
    buffers: list = []
    header = encode_instances([{"x": x, "s": "text", "b": b"\x00\x01"}], buffers)
    assert header == [{"x": {"t": "nd", "dtype": "float16", "shape": [2, 3], "buf": 0},
                       "s": {"t": "str", "v": "text"}, "b": {"t": "bytes", "buf": 1}}]
    assert bytes(buffers[0]) == x.tobytes() and buffers[1] == b"\x00\x01"
    frames = pack(Kind.RESULT, {"k": 1}, buffers)
    assert frames[0] == b"r" and msgpack.unpackb(frames[1]) == {"v": PROTOCOL_VERSION, "k": 1}
    assert b"pickle" not in frames[1] and not bytes(frames[1]).startswith(b"\x80")  # no pickle protocol header


@pytest.mark.parametrize("dtype", ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                                   "float16", "float32", "float64"])
def test_roundtrip_dtypes(dtype: str) -> None:
    x = (np.arange(24) % 3).astype(dtype).reshape(2, 3, 4)
    out = roundtrip([{"x": x, "e": np.zeros((0, 3), dtype)}])[0]
    assert out["x"].dtype == np.dtype(dtype) and out["x"].shape == (2, 3, 4)
    np.testing.assert_array_equal(out["x"], x)
    assert out["e"].shape == (0, 3)


def test_non_contiguous_and_scalar() -> None:
    x = np.arange(16, dtype=np.int32).reshape(4, 4)[:, 1]
    out = roundtrip([{"x": x, "s": np.float32(2.5)}])[0]
    np.testing.assert_array_equal(out["x"], [1, 5, 9, 13])
    assert out["s"].shape == () and out["s"] == np.float32(2.5)


@pytest.mark.parametrize("frames", [
    [b"P"],
    [b"?", msgpack.packb({"v": PROTOCOL_VERSION})],
    [b"P", b"\xc1not msgpack"],
    [b"P", msgpack.packb([1, 2])],
    [b"P", msgpack.packb({"v": 999})],
])
def test_malformed_frames(frames: list[bytes]) -> None:
    with pytest.raises(InvalidInput):
        unpack(frames)


@pytest.mark.parametrize("desc", [
    {"t": "nd", "dtype": "float32", "shape": [2], "buf": 0},  # 8 bytes needed, 3 given
    {"t": "nd", "dtype": "object", "shape": [1], "buf": 0},
    {"t": "nd", "dtype": "int8", "shape": [-3], "buf": 0},
    {"t": "nd", "dtype": "int8", "shape": [3], "buf": 5},
    {"t": "zzz"},
    {"t": "str", "v": 5},
    "not a map",
])
def test_malformed_descriptors(desc: object) -> None:
    with pytest.raises(InvalidInput):
        decode_instances([{"x": desc}], [b"abc"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_unpack_never_raises_anything_but_invalid_input(frames: list[bytes]) -> None:
    try:
        _, header, bufs = unpack(frames)
        decode_instances(header.get("instances"), bufs)
    except InvalidInput:
        pass


def table(tmp_path: Path, data: object) -> str:
    p = tmp_path / "rt.json"
    p.write_text(json.dumps(data))
    return str(p)


def server_list(ids: list[tuple[str, str]], ip: str = "10.0.0.1") -> dict:
    return {"server_list": [{"server_id": ip, "device": [{"device_id": d, "rank_id": r} for d, r in ids]}]}


def test_rank_table_layouts(tmp_path: Path) -> None:
    ranks = parse_rank_table(table(tmp_path, server_list([("0", "0"), ("1", "1")])))
    assert [(r.rank, r.ip, r.device_id) for r in ranks] == [(0, "10.0.0.1", 0), (1, "10.0.0.1", 1)]
    group = {"group_list": [{"instance_list": [{"server_id": "h1", "rank_id": "0", "devices": [{"device_id": "3"}]},
                                               {"server_id": "h2", "rank_id": "1", "devices": [{"device_id": "0"}]}]}]}
    ranks = parse_rank_table(table(tmp_path, group))
    assert [(r.rank, r.ip, r.device_id) for r in ranks] == [(0, "h1", 3), (1, "h2", 0)]


@pytest.mark.parametrize(("data", "fragment"), [
    ([1, 2], "should hold a JSON object"),
    ({"server_list": []}, "'server_list' should be a non-empty array"),
    (server_list([("0", "1")]), "device size not match rank_id"),
    (server_list([("0wer", "0")]), "is not a decimal integer"),
    (server_list([("0", "1wdb")]), "is not a decimal integer"),
    (server_list([("0", "")]), "should be a non-empty string"),
    (server_list([("0", "0")], ip=""), "'server_id' should be a non-empty string"),
])
def test_rank_table_errors(tmp_path: Path, data: object, fragment: str) -> None:
    with pytest.raises(RuntimeError, match=fragment):
        parse_rank_table(table(tmp_path, data))


def test_rank_table_against_declaration(tmp_path: Path) -> None:
    path = table(tmp_path, server_list([("0", "0"), ("1", "1"), ("2", "2")]))
    ranks = parse_rank_table(path)
    with pytest.raises(RuntimeError, match=r"Rank size 3 declared in rank table file '.*' not equal to 4 declared in "
                                           r"servable config"):
        check_against_declaration(ranks, path, 4, 1)
    with pytest.raises(RuntimeError, match="Rank size must be an integral multiple of stage size"):
        check_against_declaration(ranks, path, 3, 2)
    check_against_declaration(ranks, path, 3, 3)
    with pytest.raises(RuntimeError, match="Rank table file '/nonexistent.json' does not exist"):
        parse_rank_table("/nonexistent.json")


@pytest.mark.parametrize(("address", "fragment"), [
    ("127.0.0.1", "The format of the RESTful server address '127.0.0.1' is illegal"),
    (":1500", "Missing ip or port of the RESTful server address ':1500'"),
    ("127.0.0.1:", "Missing ip or port"),
    ("127.0.0.1:15a0", "The type of RESTful server address '127.0.0.1:15a0' port is not a number"),
    ("127.0.0.1:65536", "The port of the RESTful server address '127.0.0.1:65536' is out of legal range [1 ~ 65535]"),
    ("127.0.0.1:0", "out of legal range"),
    ("unix:/tmp/x", "RESTful server does not support binding to unix domain socket"),
])
def test_address_errors(address: str, fragment: str) -> None:
    with pytest.raises(RuntimeError) as info:
        parse_address(address, "RESTful server", allow_unix=False)
    assert fragment in str(info.value)


def test_address_ok() -> None:
    assert parse_address("127.0.0.1:1500", "x") == ("127.0.0.1", 1500)
    assert parse_address("unix:/tmp/s", "x") == ("/tmp/s", None)
    with pytest.raises(RuntimeError, match="Empty grpc server unix domain socket address"):
        parse_address("unix:", "Serving gRPC")


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"servable_directory": ""}, "Parameter 'servable_directory' should not be empty str"),
    ({"servable_name": 3}, "Parameter 'servable_name' should be str, but actually <class 'int'>"),
    ({"device_ids": [0, 0]}, "The item value '0' in parameter 'device_ids' should not be repeated"),
    ({"device_ids": -1}, "Parameter 'device_ids' should be >= 0"),
    ({"device_ids": "0"}, "Parameter 'device_ids' should be int or tuple/list of int"),
    ({"version_number": -1}, "Parameter 'version_number' should be >= 0"),
    ({"device_type": "TPU"}, "Unsupported device type 'TPU', only support 'Ascend', 'GPU', 'CPU' and None, case "
                             "ignored"),
    ({"num_parallel_workers": 65}, "Parameter 'num_parallel_workers' should be in range [0,64]"),
])
def test_start_config_errors(kwargs: dict, fragment: str) -> None:
    args = {"servable_directory": "/tmp", "servable_name": "add", **kwargs}
    with pytest.raises(RuntimeError) as info:
        ServableStartConfig(**args)
    assert fragment in str(info.value)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVABLE_HEARTBEAT_TIMEOUT_S", "7.5")
    assert Settings.from_env().heartbeat_timeout_s == 7.5
    with pytest.raises(ValueError, match="heartbeat_timeout_s must be greater than heartbeat_interval_s"):
        Settings.from_env(heartbeat_interval_s=10)
    with pytest.raises(ValueError):
        Settings.from_env(no_such_setting=1)
