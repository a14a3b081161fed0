"""KServe v2 codec (JSON + binary requests and responses, checked against tritonclient's own encoder and
decoder), the routes over a fake dispatcher (model naming, metadata, error mapping, limits), and the method
signatures the Worker registers."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from starlette.applications import Starlette
from starlette.testclient import TestClient
from tritonclient.utils import deserialize_bytes_tensor

from servable_framework.errors import InvalidInput, NotFound, Overloaded, RequestTimeout, ServingError
from servable_framework.main import kserve
from servable_framework.main.dispatcher import Dispatcher
from servable_framework.main.kserve_codec import OutputRequest, decode_request, encode_response
from servable_framework.main.workers import WorkerHandle, WorkerState
from servable_framework.servable.spec import MethodSpec, ModelSpec, ServableSpec, StageSpec, TensorDef
from servable_framework.worker.signatures import method_signatures

# ------------------------------------------------------------------------------------------ decoding


def triton_body(arrays: dict[str, tuple[np.ndarray, str]], binary: bool, **kw: Any) -> tuple[bytes, str | None]:
    """A request body exactly as tritonclient builds it."""
    tensors = []
    for name, (value, datatype) in arrays.items():
        tensor = httpclient.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value, binary_data=binary)
        tensors.append(tensor)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(tensors, **kw)
    return body, None if json_size is None else str(json_size)


NUMERIC = [
    (np.array([True, False, True]), "BOOL"),
    (np.array([[0, 255]], np.uint8), "UINT8"),
    (np.array([0, 65535], np.uint16), "UINT16"),
    (np.array([0, 2**32 - 1], np.uint32), "UINT32"),
    (np.array([0, 2**64 - 1], np.uint64), "UINT64"),
    (np.array([-128, 127], np.int8), "INT8"),
    (np.array([-(2**15), 2**15 - 1], np.int16), "INT16"),
    (np.array([[-(2**31)], [2**31 - 1]], np.int32), "INT32"),
    (np.array([-(2**63), 2**63 - 1], np.int64), "INT64"),
    (np.array([0.1, -65504.0, 6.1e-5], np.float16), "FP16"),
    (np.array([[0.1, -3.4e38], [1e-45, 7.0]], np.float32), "FP32"),
    (np.array([0.1, 1e308, -5e-324], np.float64), "FP64"),
    (np.zeros((0, 3), np.float32), "FP32"),
    (np.array(2.5, np.float32), "FP32"),
]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize(("value", "datatype"), NUMERIC, ids=[f"{d}-{v.shape}" for v, d in NUMERIC])
def test_numeric_tensors_from_tritonclient(value: np.ndarray, datatype: str, binary: bool) -> None:
    body, header = triton_body({"x": (value, datatype)}, binary)
    got = decode_request(body, header).instance["x"]
    assert isinstance(got, np.ndarray)
    assert got.dtype == value.dtype and got.shape == value.shape
    np.testing.assert_array_equal(got, value)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_bytes_tensor_is_one_str_or_bytes(binary: bool) -> None:
    body, header = triton_body({"p": (np.array(["héllo"], dtype=object), "BYTES"),
                                "q": (np.array([[b"raw"]], dtype=object), "BYTES")}, binary)
    instance = decode_request(body, header).instance
    assert instance == {"p": "héllo", "q": "raw"}  # UTF-8 becomes str, either way
    if binary:
        body, header = triton_body({"img": (np.array([b"\x89PNG\xff"], dtype=object), "BYTES")}, binary)
        assert decode_request(body, header).instance == {"img": b"\x89PNG\xff"}  # not UTF-8: bytes


def test_bytes_content_type_forces_a_kind() -> None:
    doc = {"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"],
                       "parameters": {"content_type": "bytes"}},
                      {"name": "b", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5,
                                                                                        "content_type": "bytes"}}]}
    head = json.dumps(doc).encode()
    decoded = decode_request(head + struct.pack("<I", 1) + b"y", str(len(head)))
    assert decoded.instance == {"a": b"x", "b": b"y"}
    doc = {"inputs": [{"name": "b", "shape": [1], "datatype": "BYTES",
                       "parameters": {"binary_data_size": 5, "content_type": "str"}}]}
    head = json.dumps(doc).encode()
    with pytest.raises(InvalidInput, match="content_type 'str' but the bytes are not UTF-8"):
        decode_request(head + struct.pack("<I", 1) + b"\xff", str(len(head)))


def test_request_fields_outputs_and_timeout() -> None:
    value = np.ones((2, 2), np.float32)
    outputs = [httpclient.InferRequestedOutput("y", binary_data=True), httpclient.InferRequestedOutput("z",
                                                                                                     binary_data=False)]
    body, header = triton_body({"x": (value, "FP32")}, True, outputs=outputs, request_id="r1", timeout=2_500_000)
    decoded = decode_request(body, header)
    assert decoded.id == "r1"
    assert decoded.outputs == [OutputRequest("y", True), OutputRequest("z", False)]
    assert decoded.timeout_s == 2.5
    assert not decoded.binary_output
    body, header = triton_body({"x": (value, "FP32")}, False)  # no outputs named: all, binary
    decoded = decode_request(body, header)
    assert decoded.outputs is None and decoded.binary_output and decoded.timeout_s is None and decoded.id is None


def test_nested_and_flat_json_data_are_row_major() -> None:
    for data in ([1, 2, 3, 4, 5, 6], [[1, 2, 3], [4, 5, 6]], [[[1], [2]], [[3, 4, 5, 6]]]):
        doc = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "INT64", "data": data}]}
        got = decode_request(json.dumps(doc).encode(), None).instance["x"]
        np.testing.assert_array_equal(got, np.arange(1, 7).reshape(2, 3))
    deep = b"[" * 100_000 + b"1.0" + b"]" * 100_000
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + deep + b"}]}"
    with pytest.raises(InvalidInput, match="nesting too deep"):
        decode_request(body, None)


def _json_input(data: Any, datatype: str = "FP32", shape: list[Any] | None = None, **extra: Any) -> bytes:
    tensor = {"name": "x", "shape": [len(data)] if shape is None else shape, "datatype": datatype, "data": data,
              **extra}
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize(("body", "fragment"), [
    (b"{", "malformed JSON"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', "malformed JSON: NaN"),
    (b"\xff\xfe", "malformed JSON"),
    (b"", "the request body is empty"),
    (b'"text"', "invalid request: Input should be a valid dictionary"),
    (b'{"inputs": {}}', "invalid request: inputs: Input should be a valid list"),
    (b'{"inputs": [{"name": "x"}]}', "inputs.0.shape: Field required"),
    (b'{"id": 5, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
     "id: Input should be a valid string"),
    (_json_input([1.0], shape=[True]), "inputs.0.shape.0: Input should be a valid integer"),
    (_json_input([1.0], shape=[1.0]), "inputs.0.shape.0: Input should be a valid integer"),
    (_json_input([1.0], shape=[1] * 33), "List should have at most 32 items"),
    (_json_input([1.0], name=""), "inputs.0.name: String should have at least 1 character"),
    (_json_input([1.0], datatype="BF16"), "unsupported datatype 'BF16'"),
    (_json_input([1.0], datatype="fp32"), "unsupported datatype 'fp32'"),
    (_json_input([1, 0], datatype="BOOL"), "BOOL data must be true/false"),
    (_json_input([True], datatype="INT32"), "INT32 data must be JSON integers"),
    (_json_input([256], datatype="UINT8"), "256 is out of UINT8 range [0, 255]"),
    (_json_input([-1], datatype="UINT64"), "-1 is out of UINT64 range"),
    (_json_input([2**63], datatype="INT64"), "out of INT64 range"),
    (_json_input([True]), "FP32 data must be JSON numbers"),
    (_json_input([None]), "FP32 data must be JSON numbers"),
    (_json_input([1e39]), "out of FP32 range"),
    (_json_input([10**400]), "out of FP32 range"),
    (_json_input([0.1], datatype="FP16"), "FP16 JSON data must be exactly representable"),
    (_json_input([70000.0], datatype="FP16"), "out of FP16 range"),
    (_json_input([1.0, 2.0], shape=[3]), "shape [3] needs 3 elements, 'data' has 2"),
    (_json_input([[1.0, 2.0], [3.0]], shape=[2, 2]), "shape [2, 2] needs 4 elements, 'data' has 3"),
    (_json_input([1, 2], datatype="BYTES"), "a BYTES tensor must hold exactly one element"),
    (_json_input([1], datatype="BYTES"), "BYTES data must be a JSON string"),
    (_json_input(["\ud800"], datatype="BYTES"), "lone surrogate"),
    (_json_input([1.0], parameters={"shared_memory_region": "r"}), "shared memory is not supported"),
    (_json_input([1.0], parameters={"binary_data_size": "4"}), "binary_data_size: Input should be a valid integer"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}).encode(), "has no 'data'"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                 "outputs": [{"name": "y"}, {"name": "y"}]}).encode(), "output 'y' is requested more than once"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                 "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}).encode(),
     "binary_data: Input should be a valid boolean"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                 "parameters": {"timeout": -5}}).encode(), "timeout: Input should be greater than 0"),
])
def test_bad_json_requests(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidInput) as err:
        decode_request(body, None)
    assert fragment in err.value.message, err.value.message
    assert err.value.http_status == 400


def _binary(specs: list[tuple[str, str, list[int], int]], payload: bytes) -> tuple[bytes, str]:
    head = json.dumps({"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": size}}
                                  for n, d, s, size in specs]}).encode()
    return head + payload, str(len(head))


@pytest.mark.parametrize(("specs", "payload", "header", "fragment"), [
    ([("x", "FP32", [2], 8)], b"\0" * 7, None, "goes past the end of the body"),
    ([("x", "FP32", [2], 6)], b"\0" * 6, None, "binary_data_size 6 does not match shape [2] of FP32 (8 bytes)"),
    ([("x", "FP32", [2], 8)], b"\0" * 9, None, "1 bytes of binary data that no input's binary_data_size claims"),
    ([("x", "BYTES", [1], 3)], b"\0" * 3, None, "must start with a 4-byte length"),
    ([("x", "BYTES", [1], 6)], struct.pack("<I", 1) + b"ab", None, "does not fill binary_data_size 6"),
    ([("x", "BYTES", [1], 6)], struct.pack("<I", 9) + b"ab", None, "does not fill binary_data_size 6"),
    ([("x", "FP32", [0, 2**62], 0)], b"", None, "invalid shape [0, 4611686018427387904]"),
    ([("x", "FP32", [2], 8)], b"\0" * 8, "-3", "must be a byte count"),
    ([("x", "FP32", [2], 8)], b"\0" * 8, "١٢", "must be a byte count"),  # non-ASCII digits
    ([("x", "FP32", [2], 8)], b"\0" * 8, "99999", "but the body has"),
])
def test_bad_binary_requests(specs: list[tuple[str, str, list[int], int]], payload: bytes, header: str | None,
                             fragment: str) -> None:
    body, length = _binary(specs, payload)
    with pytest.raises(InvalidInput) as err:
        decode_request(body, header or length)
    assert fragment in err.value.message, err.value.message


def test_binary_and_json_inputs_mix_in_order() -> None:
    a = np.arange(4, dtype=np.int16)
    b = np.array([[1.5, -2.0]], np.float64)
    doc = {"inputs": [{"name": "a", "datatype": "INT16", "shape": [4], "parameters": {"binary_data_size": 8}},
                      {"name": "j", "datatype": "BOOL", "shape": [1], "data": [True]},
                      {"name": "b", "datatype": "FP64", "shape": [1, 2], "parameters": {"binary_data_size": 16}},
                      {"name": "t", "datatype": "BOOL", "shape": [3], "parameters": {"binary_data_size": 3}}]}
    head = json.dumps(doc).encode()
    body = head + a.astype("<i2").tobytes() + b.astype("<f8").tobytes() + bytes([0, 1, 7])
    inst = decode_request(body, str(len(head))).instance
    np.testing.assert_array_equal(inst["a"], a)
    np.testing.assert_array_equal(inst["b"], b)
    np.testing.assert_array_equal(inst["j"], [True])
    np.testing.assert_array_equal(inst["t"], [False, True, True])  # any non-zero byte is true
    assert list(inst) == ["a", "j", "b", "t"]
    with pytest.raises(InvalidInput, match="more than once"):
        decode_request(json.dumps({"inputs": [doc["inputs"][1], doc["inputs"][1]]}).encode(), None)
    with pytest.raises(InvalidInput, match="has both 'data' and binary_data_size"):
        both = {"inputs": [{**doc["inputs"][3], "data": [True, True, True]}]}
        head = json.dumps(both).encode()
        decode_request(head + b"\1\1\1", str(len(head)))


# ------------------------------------------------------------------------------------------ encoding


def _parse(encoded: Any) -> httpclient.InferResult:
    """The response as tritonclient reads it."""
    return httpclient.InferResult.from_response_body(encoded.body, header_length=encoded.header_length)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_outputs_read_back_by_tritonclient(binary: bool) -> None:
    outputs = {
        "f16": np.array([[0.1, -2.0]], np.float16),
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "u64": np.array([2**64 - 1], np.uint64),
        "i8": np.array([-3], np.int8),
        "b": np.array([[True], [False]]),
        "scalar": np.array(3.25, np.float64),
        "text": "héllo",
        "raw": b"bytes",
        "words": np.array([["a", "bc"], ["d", ""]]),
        "empty": np.zeros((0, 2), np.int32),
    }
    encoded = encode_response("m", "1", "id-1", outputs, None, binary)
    assert (encoded.header_length is not None) is binary
    result = _parse(encoded)
    response = result.get_response()
    assert response["model_name"] == "m" and response["model_version"] == "1" and response["id"] == "id-1"
    assert [o["name"] for o in response["outputs"]] == list(outputs)
    for name in ("f16", "f32", "u64", "i8", "b", "scalar", "empty"):
        got = result.as_numpy(name)
        assert got.dtype == outputs[name].dtype and got.shape == outputs[name].shape, name
        np.testing.assert_array_equal(got, outputs[name])
    assert result.as_numpy("text").tolist() == ([b"h\xc3\xa9llo"] if binary else ["héllo"])
    assert result.as_numpy("raw").tolist() == ([b"bytes"] if binary else ["bytes"])
    words = result.as_numpy("words")
    assert words.shape == (2, 2)
    assert words.tolist() == ([[b"a", b"bc"], [b"d", b""]] if binary else [["a", "bc"], ["d", ""]])
    datatypes = {o["name"]: o["datatype"] for o in response["outputs"]}
    assert datatypes == {"f16": "FP16", "f32": "FP32", "u64": "UINT64", "i8": "INT8", "b": "BOOL",
                         "scalar": "FP64", "text": "BYTES", "raw": "BYTES", "words": "BYTES", "empty": "INT32"}


def test_output_selection_and_per_output_binary() -> None:
    outputs = {"y": np.array([1.0, np.nan, np.inf], np.float32), "z": np.array([1], np.int32)}
    encoded = encode_response("m", None, None, outputs, [OutputRequest("y", False)], True)
    document = json.loads(encoded.body)
    assert document == {"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [3],
                                                        "data": [1.0, None, None]}]}  # JSON has no NaN
    encoded = encode_response("m", None, None, outputs, [OutputRequest("z", True), OutputRequest("y", True)], False)
    assert encoded.header_length is not None
    head = json.loads(encoded.body[:encoded.header_length])
    assert [o["name"] for o in head["outputs"]] == ["z", "y"]
    assert encoded.body[encoded.header_length:] == struct.pack("<i", 1) + outputs["y"].astype("<f4").tobytes()
    result = _parse(encoded)
    assert np.isnan(result.as_numpy("y")[1])
    with pytest.raises(InvalidInput, match="output 'w' is not an output of this model"):
        encode_response("m", None, None, outputs, [OutputRequest("w", False)], False)


def test_bytes_outputs_binary_layout_and_json_limits() -> None:
    encoded = encode_response("m", None, None, {"t": "ab", "u": b"\xff"}, None, True)
    assert encoded.header_length is not None
    raw = encoded.body[encoded.header_length:]
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"\xff"
    assert deserialize_bytes_tensor(raw[:6]).tolist() == [b"ab"]
    with pytest.raises(InvalidInput, match="not UTF-8, which JSON cannot carry"):
        encode_response("m", None, None, {"u": b"\xff"}, None, False)
    with pytest.raises(ServingError, match="has data type complex64, which has no KServe datatype") as err:
        encode_response("m", None, None, {"c": np.ones(2, np.complex64)}, None, False)
    assert err.value.http_status == 500
    with pytest.raises(ServingError, match="holds int values"):
        encode_response("m", None, None, {"o": np.array([1, "a"], dtype=object)}, None, False)


# -------------------------------------------------------------------------------------- routes (fake)


def handle(worker_id: str, servable: str, version: int, methods: dict[str, list[str]],
           signatures: dict[str, Any] | None = None, state: WorkerState = WorkerState.READY) -> WorkerHandle:
    h = WorkerHandle(worker_id, {"servable_name": servable, "version": version}, "")
    h.methods, h.signatures, h.state = methods, signatures or {}, state
    return h


ADD_SIGNATURE = {"inputs": [{"name": "x1", "dtype": "float32", "shape": [2, 2], "optional": False},
                            {"name": "x2", "dtype": None, "shape": None, "optional": False},
                            {"name": "scale", "dtype": "float64", "shape": [], "optional": True}],
                 "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}]}


class FakeDispatcher:
    """What the KServe routes use of `Dispatcher`: its Workers, readiness, draining, ``predict``."""

    def __init__(self, *handles: WorkerHandle) -> None:
        self.lost: list[str] = []  # what WorkerSet.lost() reports: endpoints whose restart budget is spent
        self.workers = SimpleNamespace(workers={h.worker_id: h for h in handles}, lost=lambda: self.lost)
        self.draining = False
        self.calls: list[tuple[Any, ...]] = []
        self.answer: Any = None

    def ready(self) -> dict[str, Any]:
        return Dispatcher.ready(self)  # type: ignore[arg-type]

    async def predict(self, servable: str, method: str, version: int, instances: list[dict[str, Any]],
                      timeout_s: float | None = None, *, protocol: str = "rest") -> list[Any]:
        assert protocol == "kserve"  # the label of the request's metrics
        self.calls.append((servable, method, version, instances, timeout_s))
        if isinstance(self.answer, Exception):
            raise self.answer
        if self.answer is not None:
            return [self.answer]
        return [{"y": instances[0]["x1"] + 1}]


@pytest.fixture
def fake() -> tuple[FakeDispatcher, TestClient]:
    dispatcher = FakeDispatcher(
        handle("w0", "add", 1, {"other": ["a"], "predict": ["x1", "x2"]}, {"predict": ADD_SIGNATURE}),
        handle("w1", "add", 2, {"other": ["a"], "predict": ["x1", "x2"]}, {"predict": ADD_SIGNATURE}),
        handle("w2", "multi", 1, {"predict": ["x"], "extra": ["x"]}),
        handle("w3", "none", 1, {"a": ["x"], "b": ["x"]}),
        handle("w4", "late", 0, {}, state=WorkerState.STARTING),
        handle("w5", "dotted.name", 3, {"run": ["x"]}),
    )
    app = Starlette(routes=kserve.routes(dispatcher, 4096))  # type: ignore[arg-type]
    return dispatcher, TestClient(app)


def _infer_body(x1: list[float], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x1", "shape": [len(x1)], "datatype": "FP32", "data": x1},
                       {"name": "x2", "shape": [1], "datatype": "BYTES", "data": ["s"]}], **extra}


def test_model_names_default_methods_and_versions(fake: tuple[FakeDispatcher, TestClient]) -> None:
    dispatcher, client = fake
    ok = [("add", "add", "predict", 0), ("add.predict", "add", "predict", 0), ("add.other", "add", "other", 0),
          ("multi", "multi", "predict", 0), ("multi.extra", "multi", "extra", 0), ("none.b", "none", "b", 0),
          ("dotted.name", "dotted.name", "run", 0), ("dotted.name.run", "dotted.name", "run", 0)]
    for name, servable, method, version in ok:
        r = client.post(f"/v2/models/{name}/infer", json=_infer_body([1.0]))
        assert r.status_code == 200, (name, r.text)
        assert dispatcher.calls[-1][:3] == (servable, method, version)
    r = client.post("/v2/models/add/versions/1/infer", json=_infer_body([1.0], id="q"))
    assert dispatcher.calls[-1][:3] == ("add", "predict", 1)
    assert r.json() == {"model_name": "add", "model_version": "1", "id": "q",
                        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": [2.0]}]}
    assert client.post("/v2/models/add/infer", json=_infer_body([1.0])).json()["model_version"] == "2"
    missing = [("/v2/models/none/infer", "model 'none' has no default method (several methods, none named "
                                         "'predict'): use one of none.a, none.b"),
               ("/v2/models/nothere/infer", "unknown model 'nothere' (models: add, add.other, add.predict, "
                                            "dotted.name, dotted.name.run, multi, multi.predict, multi.extra, "
                                            "none.a, none.b)"),
               ("/v2/models/add.nope/infer",
                "unknown model 'add.nope': servable 'add' has no method 'nope' (methods: other, predict)"),
               ("/v2/models/add/versions/3/infer", "model 'add' has no version '3' (versions: 1, 2)"),
               ("/v2/models/add/versions/0/infer", "has no version '0'"),
               ("/v2/models/add/versions/01x/infer", "has no version '01x'")]
    for path, message in missing:
        r = client.post(path, json=_infer_body([1.0]))
        assert r.status_code == 404 and list(r.json()) == ["error"] and message in r.json()["error"], (path, r.text)
    r = client.post("/v2/models/late/infer", json=_infer_body([1.0]))
    assert r.status_code == 503 and r.json() == {"error": "model 'late' is not available yet: starting"}


def test_readiness_routes(fake: tuple[FakeDispatcher, TestClient]) -> None:
    dispatcher, client = fake
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 503 and r.json() == {"ready": False}  # 'late' is still starting
    assert client.get("/v2/models/add.other/versions/2/ready").json() == {"name": "add.other", "ready": True}
    assert client.get("/v2/models/late/ready").status_code == 503
    assert client.get("/v2/models/nothere/ready").status_code == 404
    dispatcher.workers.workers.pop("w4")
    assert client.get("/v2/health/ready").json() == {"ready": True}
    dispatcher.lost = ["servable 'add' version 1: every Worker gave up"]
    r = client.get("/v2/health/live")
    assert r.status_code == 503 and r.json() == {"live": False}
    dispatcher.lost = []
    dispatcher.workers.workers["w1"].state = WorkerState.UNAVAILABLE  # the newest version is down
    r = client.get("/v2/models/add/ready")
    assert r.status_code == 503 and r.json() == {"name": "add", "ready": False}
    assert client.get("/v2/models/add/versions/1/ready").status_code == 200
    dispatcher.draining = True
    assert client.get("/v2/models/add/versions/1/ready").status_code == 503
    assert client.get("/v2/health/ready").status_code == 503
    assert client.head("/v2/health/live").status_code == 200


def test_metadata(fake: tuple[FakeDispatcher, TestClient]) -> None:
    _, client = fake
    meta = client.get("/v2/models/add").json()
    assert meta == {
        "name": "add", "versions": ["2"], "platform": "servable_framework",
        "inputs": [{"name": "x1", "datatype": "FP32", "shape": [2, 2]},
                   {"name": "x2", "datatype": "UNKNOWN", "shape": [-1]},
                   {"name": "scale", "datatype": "FP64", "shape": [], "parameters": {"optional": True}}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    }
    assert client.get("/v2/models/add/versions/1").json()["versions"] == ["1"]
    # a Worker that registered no signature: the required input names Main routes by, outputs unknown
    assert client.get("/v2/models/multi").json()["inputs"] == [{"name": "x", "datatype": "UNKNOWN", "shape": [-1]}]
    assert client.get("/v2/models/multi").json()["outputs"] == []
    server = client.get("/v2").json()
    assert server["name"] == "servable_framework" and server["extensions"] == ["binary_tensor_data"]


def test_names_are_checked_against_the_signature(fake: tuple[FakeDispatcher, TestClient]) -> None:
    dispatcher, client = fake
    body = _infer_body([1.0])
    body["inputs"].append({"name": "zz", "shape": [1], "datatype": "FP32", "data": [0]})
    r = client.post("/v2/models/add/infer", json=body)
    assert r.status_code == 400 and r.json() == {"error": "model 'add' has no input 'zz' (inputs: x1, x2, scale)"}
    r = client.post("/v2/models/add/infer", json=_infer_body([1.0], outputs=[{"name": "q"}]))
    assert r.status_code == 400 and r.json() == {"error": "model 'add' has no output 'q' (outputs: y)"}
    assert not dispatcher.calls  # refused before running


def test_errors_map_to_statuses(fake: tuple[FakeDispatcher, TestClient]) -> None:
    dispatcher, client = fake
    cases = [(InvalidInput("bad"), 400), (NotFound("gone"), 404), (Overloaded("busy"), 503),
             (RequestTimeout("late"), 504), (ServingError("broken"), 500), (RuntimeError("bug"), 500)]
    for exc, status in cases:
        dispatcher.answer = exc
        r = client.post("/v2/models/add/infer", json=_infer_body([1.0]))
        assert r.status_code == status, (exc, r.text)
        expected = "Serving Error: internal error: RuntimeError" if isinstance(exc, RuntimeError) else str(exc)
        assert r.json() == {"error": expected}
        assert ("retry-after" in r.headers) is isinstance(exc, Overloaded)
    dispatcher.answer = None
    assert client.post("/v2/models/add/infer", json=_infer_body([1.0])).status_code == 200  # still serving
    r = client.get("/v2/models/add/infer")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json() == {"error": "GET is not allowed on /v2/models/add/infer: use POST"}
    r = client.put("/v2/models/add")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    r = client.get("/v2/repository/index")
    assert r.status_code == 404 and r.json() == {"error": "unknown KServe v2 path '/v2/repository/index'"}


def test_instance_error_and_encoding_error(fake: tuple[FakeDispatcher, TestClient]) -> None:
    dispatcher, client = fake

    async def failing(*args: Any, **kw: Any) -> list[Any]:
        return [InvalidInput("Given model input 0 data type int32 not match")]

    dispatcher.predict = failing  # type: ignore[method-assign]
    r = client.post("/v2/models/add/infer", json=_infer_body([1.0]))
    assert r.status_code == 400 and r.json() == {"error": "Given model input 0 data type int32 not match"}


def test_timeouts_reach_the_dispatcher(fake: tuple[FakeDispatcher, TestClient]) -> None:
    dispatcher, client = fake
    client.post("/v2/models/add/infer", json=_infer_body([1.0], parameters={"timeout": 1_500_000}))
    assert dispatcher.calls[-1][4] == 1.5
    client.post("/v2/models/add/infer", json=_infer_body([1.0], parameters={"timeout": 1_500_000}),
                headers={"X-Request-Timeout-S": "7"})
    assert dispatcher.calls[-1][4] == 7.0
    r = client.post("/v2/models/add/infer", json=_infer_body([1.0]), headers={"X-Request-Timeout-S": "no"})
    assert r.status_code == 400 and "x-request-timeout-s" in r.json()["error"]


def test_size_limit_and_compression(fake: tuple[FakeDispatcher, TestClient]) -> None:
    dispatcher, client = fake
    big = json.dumps(_infer_body([0.5] * 2000)).encode()
    r = client.post("/v2/models/add/infer", content=big)
    assert r.status_code == 413 and r.json() == {"error": "http message is bigger than 4096"}
    small = json.dumps(_infer_body([0.5, 1.5])).encode()
    for encoding, packed in (("gzip", gzip.compress(small)), ("deflate", zlib.compress(small))):
        r = client.post("/v2/models/add/infer", content=packed, headers={"Content-Encoding": encoding})
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1.5, 2.5]
    bomb = gzip.compress(json.dumps(_infer_body([0.0] * 5000)).encode())
    assert len(bomb) < 4096
    r = client.post("/v2/models/add/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and r.json() == {"error": "http message is bigger than 4096 once decompressed"}
    r = client.post("/v2/models/add/infer", content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "not valid gzip data" in r.json()["error"]
    assert len(dispatcher.calls) == 2


def test_binary_response_headers(fake: tuple[FakeDispatcher, TestClient]) -> None:
    _, client = fake
    r = client.post("/v2/models/add/infer", json=_infer_body([1.0, 2.0], parameters={"binary_data_output": True}))
    assert r.headers["content-type"] == "application/octet-stream"
    length = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:length])
    assert head["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2],
                                "parameters": {"binary_data_size": 8}}]
    assert np.frombuffer(r.content[length:], "<f4").tolist() == [2.0, 3.0]


# ------------------------------------------------------------------------------------------ signatures


class _Info(SimpleNamespace):
    pass


def test_method_signatures_from_declaration_and_program() -> None:
    import torch

    class Net(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return a + b, (a * b).to(torch.int64)

    batch = torch.export.Dim("batch")
    program = torch.export.export(Net(), (torch.ones(3, 2), torch.ones(3, 2)),
                                  dynamic_shapes=({0: batch}, {0: batch}))
    backend = SimpleNamespace(inputs=[_Info(dtype=np.dtype(np.float32), shape=(None, 2))] * 2,
                              module=program.module())
    model = ModelSpec("net.pt2", ["net.pt2"], "TorchExport", with_batch_dim=True, without_batch_dim_inputs=(),
                      max_batch_size=0, max_batch_delay_ms=0)

    def cast(x: Any) -> Any:
        return x

    method = MethodSpec("run", ["a", "b", "flag", "name", "free"], ["s", "p", "c", "echo"],
                        stages=[StageSpec([TensorDef(0, 1)], 1, "f", function=cast),
                                StageSpec([TensorDef(0, 0), TensorDef(1, 0)], 2, "m", model=model)],
                        returns=[TensorDef(2, 0), TensorDef(2, 1), TensorDef(1, 0), TensorDef(0, 0)],
                        defaults={"flag": True, "name": "x", "free": None})
    spec = ServableSpec("srv", "/tmp", models=[model], methods={"run": method})
    sig = method_signatures(spec, {"net.pt2": backend})["run"]
    assert sig["inputs"] == [
        {"name": "a", "dtype": "float32", "shape": [2], "optional": False},  # the batch dim is not an instance's
        {"name": "b", "dtype": None, "shape": None, "optional": False},  # through a Python stage first
        {"name": "flag", "dtype": "bool", "shape": [], "optional": True},
        {"name": "name", "dtype": "str", "shape": [1], "optional": True},
        {"name": "free", "dtype": None, "shape": None, "optional": True},
    ]
    assert sig["outputs"] == [{"name": "s", "dtype": "float32", "shape": [2]},
                              {"name": "p", "dtype": "int64", "shape": [2]},
                              {"name": "c", "dtype": None, "shape": None},
                              {"name": "echo", "dtype": "float32", "shape": [2]}]
    # Agents (a distributed model) or a module without a graph: names only
    unknown = method_signatures(spec, {"net.pt2": object()})["run"]
    assert unknown["outputs"][0] == {"name": "s", "dtype": None, "shape": None}
    assert unknown["inputs"][0] == {"name": "a", "dtype": None, "shape": None, "optional": False}
