"""KServe v2 / Open Inference Protocol through the real ``tritonclient.http`` client: the tensor_add example and
the distributed MatMul served for real (Main + Worker processes, Agents), errors in KServe's shape."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.integration.test_matmul_distributed import expected, start_cluster


@pytest.fixture(scope="module")
def add_server(module_servers, add_dir):
    proc, rest, _ = module_servers.local(add_dir, "add")
    client = httpclient.InferenceServerClient(url=rest.base.removeprefix("http://"), network_timeout=60.0)
    yield proc, rest, client
    client.close()
    rest.close()


def pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two different 2x2 float32 inputs: x1 + x2 differs from 2*x1, 2*x2, x1 - x2, x1 * x2 and a transpose."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 2)).astype(np.float32), (rng.standard_normal((2, 2)) * 10).astype(np.float32)


def inputs(x1: np.ndarray, x2: np.ndarray, binary: bool, datatype: str = "FP32") -> list[httpclient.InferInput]:
    out = []
    for name, value in (("x1", x1), ("x2", x2)):
        tensor = httpclient.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value, binary_data=binary)
        out.append(tensor)
    return out


def assert_keeps_serving(client: httpclient.InferenceServerClient) -> None:
    x1, x2 = pair(99)
    result = client.infer("add.add_common", inputs(x1, x2, binary=True))
    np.testing.assert_array_equal(result.as_numpy("y"), x1 + x2)


def test_server_live_ready_and_metadata(add_server) -> None:
    _, _, client = add_server
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "servable_framework"
    assert meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


def test_model_readiness(add_server) -> None:
    _, _, client = add_server
    assert client.is_model_ready("add.add_common")
    assert client.is_model_ready("add.add_cast", "1")
    assert not client.is_model_ready("add.add_common", "7")
    assert not client.is_model_ready("nothere")
    assert not client.is_model_ready("add.nomethod")
    assert not client.is_model_ready("add")  # two methods, none named predict: no default


def test_model_metadata_from_the_declaration_and_the_program(add_server) -> None:
    _, _, client = add_server
    meta = client.get_model_metadata("add.add_common")
    assert meta == {
        "name": "add.add_common", "versions": ["1"], "platform": "servable_framework",
        "inputs": [{"name": "x1", "datatype": "FP32", "shape": [2, 2]},
                   {"name": "x2", "datatype": "FP32", "shape": [2, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 2]}],
    }
    # add_cast casts in a Python stage first: its inputs may be anything; its output is the model's
    cast = client.get_model_metadata("add.add_cast", "1")
    assert cast["inputs"] == [{"name": "x1", "datatype": "UNKNOWN", "shape": [-1]},
                              {"name": "x2", "datatype": "UNKNOWN", "shape": [-1]}]
    assert cast["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 2]}]
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("add")
    assert err.value.status() == "404"
    assert "use one of add.add_common, add.add_cast" in err.value.message()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_returns_the_sum(add_server, binary: bool) -> None:
    _, _, client = add_server
    x1, x2 = pair(1)
    outputs = [httpclient.InferRequestedOutput("y", binary_data=binary)]
    result = client.infer("add.add_common", inputs(x1, x2, binary), outputs=outputs, request_id="req-7")
    y = result.as_numpy("y")
    assert y.dtype == np.float32 and y.shape == (2, 2)
    np.testing.assert_array_equal(y, x1 + x2)
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == "add.add_common" and response["model_version"] == "1"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) is binary


def test_infer_defaults_version_url_mixed_and_compressed(add_server) -> None:
    _, _, client = add_server
    x1, x2 = pair(2)
    # no outputs named: tritonclient asks binary_data_output for all of them
    result = client.infer("add.add_common", inputs(x1, x2, binary=True), model_version="1")
    np.testing.assert_array_equal(result.as_numpy("y"), x1 + x2)
    mixed = inputs(x1, x2, binary=True)
    mixed[1].set_data_from_numpy(x2, binary_data=False)
    np.testing.assert_array_equal(client.infer("add.add_common", mixed).as_numpy("y"), x1 + x2)
    for algorithm in ("gzip", "deflate"):
        result = client.infer("add.add_common", inputs(x1, x2, binary=True), request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("y"), x1 + x2)


def test_add_cast_takes_integers(add_server) -> None:
    _, _, client = add_server
    x1 = np.array([[1, -2], [30, 4]], dtype=np.int32)
    x2 = np.array([[5, 6], [7, -800]], dtype=np.int32)
    for binary in (False, True):
        y = client.infer("add.add_cast", inputs(x1, x2, binary, "INT32")).as_numpy("y")
        np.testing.assert_array_equal(y, (x1 + x2).astype(np.float32))


def test_client_side_errors_are_kserve_shaped(add_server) -> None:
    _, _, client = add_server
    x1, x2 = pair(3)

    def failing(model: str, tensors: list[httpclient.InferInput], **kw: object) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, tensors, **kw)
        return err.value

    err = failing("nothere", inputs(x1, x2, binary=True))
    assert err.status() == "404" and "unknown model 'nothere'" in err.message()
    err = failing("add.add_common", inputs(x1, x2, binary=True), model_version="3")
    assert err.status() == "404" and "no version '3'" in err.message()
    # the model's own dtype check (FP64 where the program takes float32)
    err = failing("add.add_common", inputs(x1.astype(np.float64), x2.astype(np.float64), binary=True, datatype="FP64"))
    assert err.status() == "400" and "data type float64 not match the data type float32" in err.message()
    # the shape claims 6 elements, the data holds 4
    for binary in (False, True):
        tensors = inputs(x1, x2, binary)
        tensors[0].set_shape([2, 3])
        err = failing("add.add_common", tensors)
        assert err.status() == "400", err.message()
        assert "input 'x1'" in err.message() and "[2, 3]" in err.message()
    err = failing("add.add_common", [inputs(x1, x2, binary=True)[0]])
    assert err.status() == "400" and "Cannot find input x2" in err.message()
    extra = httpclient.InferInput("x3", [2, 2], "FP32")
    extra.set_data_from_numpy(x1)
    err = failing("add.add_common", [*inputs(x1, x2, binary=True), extra])
    assert err.status() == "400" and "has no input 'x3'" in err.message()
    err = failing("add.add_common", inputs(x1, x2, binary=True), outputs=[httpclient.InferRequestedOutput("z")])
    assert err.status() == "400" and "has no output 'z'" in err.message()
    assert_keeps_serving(client)


def _raw_infer(rest, body: bytes, headers: dict[str, str] | None = None, model: str = "add.add_common"):
    return rest.post(f"/v2/models/{model}/infer", body, headers=headers or {})


def _tensor(name: str, data: object = None, datatype: str = "FP32", shape: list[int] | None = None,
            **parameters: object) -> dict[str, object]:
    out: dict[str, object] = {"name": name, "shape": shape or [2, 2], "datatype": datatype}
    if data is not None:
        out["data"] = data
    if parameters:
        out["parameters"] = parameters
    return out


BAD_JSON_BODIES = [
    (b'{"inputs": [', "malformed JSON"),
    (b"", "the request body is empty"),
    (b"[1, 2]", "invalid request"),
    (json.dumps({"inputs": []}).encode(), "inputs: List should have at least 1 item"),
    (json.dumps({"inputs": [_tensor("x1", [1, 2, 3, 4], shape=[2, -2])]}).encode(), "inputs.0.shape.1"),
    (json.dumps({"inputs": [_tensor("x1", [1.0] * 4, datatype="FP8")]}).encode(), "unsupported datatype 'FP8'"),
    (json.dumps({"inputs": [_tensor("x1", [1.0] * 3)]}).encode(), "shape [2, 2] needs 4 elements, 'data' has 3"),
    (json.dumps({"inputs": [_tensor("x1", [1, 2, 3, 4.5], datatype="INT32")]}).encode(), "must be JSON integers"),
    (json.dumps({"inputs": [_tensor("x1", ["a", 2, 3, 4])]}).encode(), "FP32 data must be JSON numbers"),
    (json.dumps({"inputs": [_tensor("x1", [1e39, 0, 0, 0])]}).encode(), "out of FP32 range"),
    (json.dumps({"inputs": [_tensor("x1")]}).encode(), "has no 'data'"),
    (json.dumps({"inputs": [_tensor("x1", ["a", "b"], datatype="BYTES", shape=[2])]}).encode(),
     "BYTES tensor must hold exactly one element"),
    (json.dumps({"inputs": [_tensor("x1", [1.0] * 4), _tensor("x1", [1.0] * 4)]}).encode(), "more than once"),
]


@pytest.mark.parametrize(("body", "fragment"), BAD_JSON_BODIES)
def test_bad_json_requests(add_server, body: bytes, fragment: str) -> None:
    _, rest, client = add_server
    r = _raw_infer(rest, body)
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"] and fragment in r.json()["error"], r.json()
    assert_keeps_serving(client)


def _binary_body(x1: np.ndarray, x2: np.ndarray, cut: int = 0,
                 claim: int | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [
        _tensor("x1", binary_data_size=x1.nbytes if claim is None else claim),
        _tensor("x2", binary_data_size=x2.nbytes),
    ]}).encode()
    body = head + x1.tobytes() + x2.tobytes()
    return body[:len(body) - cut], {"Inference-Header-Content-Length": str(len(head))}


def test_binary_requests_and_their_errors(add_server) -> None:
    _, rest, client = add_server
    x1, x2 = pair(4)
    body, headers = _binary_body(x1, x2)
    r = _raw_infer(rest, body, headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert np.array_equal(np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, 2), x1 + x2)
    # ask the output binary: raw little-endian float32 after the JSON header
    head = json.dumps({"inputs": [_tensor("x1", binary_data_size=16), _tensor("x2", binary_data_size=16)],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}], "id": "b"}).encode()
    r = _raw_infer(rest, head + x1.tobytes() + x2.tobytes(), {"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    length = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:length])
    assert meta["id"] == "b" and meta["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert np.array_equal(np.frombuffer(r.content[length:], "<f4").reshape(2, 2), x1 + x2)

    cases = [
        (_binary_body(x1, x2, cut=3), "goes past the end of the body"),
        (_binary_body(x1, x2, claim=12), "binary_data_size 12 does not match shape [2, 2] of FP32 (16 bytes)"),
        ((body + b"xx", headers), "2 bytes of binary data that no input's binary_data_size claims"),
        ((body, {}), "a body with binary tensors needs the Inference-Header-Content-Length header"),
        ((body[:len(body) - 32], {}), "has binary_data_size but the request has no Inference-Header-Content-Length"),
        ((body, {"Inference-Header-Content-Length": "12x"}), "must be a byte count"),
        ((body, {"Inference-Header-Content-Length": str(len(body) + 1)}), "but the body has"),
        ((body, {"Inference-Header-Content-Length": "5"}), "malformed JSON"),
        ((gzip.compress(body)[:-8], {**headers, "Content-Encoding": "gzip"}), "truncated"),
        ((body, {**headers, "Content-Encoding": "br"}), "Content-Encoding 'br' is not supported"),
    ]
    for (raw, hdrs), fragment in cases:
        r = _raw_infer(rest, raw, hdrs)
        assert r.status_code == 400, (fragment, r.text)
        assert fragment in r.json()["error"], (fragment, r.json())
    assert_keeps_serving(client)


def test_bytes_tensors_reach_the_method_as_strings(add_server) -> None:
    """A BYTES input is one str: add_cast's float cast refuses it with the servable's own 400."""
    _, _, client = add_server
    for binary in (False, True):
        tensors = inputs(*pair(5), binary=binary)
        text = httpclient.InferInput("x1", [1], "BYTES")
        text.set_data_from_numpy(np.array(["abc"], dtype=object), binary_data=binary)
        with pytest.raises(InferenceServerException) as err:
            client.infer("add.add_cast", [text, tensors[1]])
        assert err.value.status() == "400"
        message = err.value.message()
        assert "could not convert string to float" in message and "'abc'" in message
        assert "b'abc'" not in message  # a str, not bytes


def test_routes_methods_and_unknown_paths(add_server) -> None:
    _, rest, _ = add_server
    r = rest.get("/v2/models/add.add_common/infer")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "use POST" in r.json()["error"]
    r = rest.post("/v2/health/live", b"")
    assert r.status_code == 405 and "error" in r.json()
    r = rest.get("/v2/models/add.add_common/config")
    assert r.status_code == 404 and r.json() == {"error": "unknown KServe v2 path '/v2/models/add.add_common/config'"}
    assert rest.get("/v2/health/live").json() == {"live": True}
    assert rest.get("/v2/health/ready").json() == {"ready": True}
    assert rest.get("/v2/models/add.add_common/versions/1/ready").json() == {"name": "add.add_common", "ready": True}
    r = rest.get("/v2/models/add.add_common/versions/x/ready")
    assert r.status_code == 404 and "no version 'x'" in r.json()["error"]
    r = rest.get("/v2/models/nothere")
    assert r.status_code == 404 and "(models: add.add_common, add.add_cast)" in r.json()["error"]
    # MindSpore's routes are untouched
    r = rest.post("/model/add:add_common", {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0] * 2] * 2}]})
    assert r.json() == {"instances": [{"y": [[2.0, 3.0], [4.0, 5.0]]}]}


# ------------------------------------------------------------------------------------------- MatMul


@pytest.fixture(scope="module")
def matmul(module_servers, matmul_dir):
    server, _, rest, _ = start_cluster(module_servers, matmul_dir(2), 2)
    rest.wait_ready(server, 120)
    client = httpclient.InferenceServerClient(url=rest.base.removeprefix("http://"), network_timeout=120.0)
    yield rest, client
    client.close()
    rest.close()


def test_matmul_through_kserve(matmul) -> None:
    _, client = matmul
    assert client.is_server_ready() and client.is_model_ready("matmul") and client.is_model_ready("matmul.predict")
    meta = client.get_model_metadata("matmul")
    assert meta["inputs"] == [{"name": "x", "datatype": "UNKNOWN", "shape": [-1]}]  # a distributed shard: unknown
    assert [o["name"] for o in meta["outputs"]] == ["y"]
    x = np.random.default_rng(6).standard_normal((128, 96)).astype(np.float32)
    for binary in (True, False):
        tensor = httpclient.InferInput("x", [128, 96], "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("matmul", [tensor], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)])
        y = result.as_numpy("y")
        assert y.dtype == np.float32 and y.shape == (128, 16)
        np.testing.assert_allclose(y, expected(x), rtol=1e-4, atol=1e-4)
    bad = httpclient.InferInput("x", [2], "FP32")
    bad.set_data_from_numpy(np.ones(2, np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("matmul", [bad])
    assert "input x must be [rows, 96]" in err.value.message()
    # the Agent reports a shard's ValueError as a plain ServingError (agent.py `_error_wire`): 500, not 400
    assert err.value.status() == "400"
    np.testing.assert_allclose(client.infer("matmul", [tensor]).as_numpy("y"), expected(x), rtol=1e-4, atol=1e-4)



def test_requests_are_counted_under_the_kserve_protocol(add_server) -> None:
    _, rest, client = add_server
    assert_keeps_serving(client)
    lines = rest.get("/metrics").text.splitlines()
    assert any('protocol="kserve"' in line and 'servable="add"' in line for line in lines)
