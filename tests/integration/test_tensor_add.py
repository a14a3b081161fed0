"""The tensor_add example served for real (Main + Worker processes, uvicorn, ZMQ): contract §8-10 bodies."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest

from servable_framework.client import Client


@pytest.fixture(scope="module")
def add_server(module_servers, add_dir):
    proc, rest, zmq_address = module_servers.local(add_dir, "add")
    yield proc, rest, zmq_address
    rest.close()


def b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()


def test_nested_list_floats(add_server) -> None:
    _, rest, _ = add_server
    x1 = [[1.5, 2.0], [3.0, -4.25]]
    x2 = [[0.5, 0.25], [10.0, 4.0]]
    r = rest.post("/model/add:add_common", {"instances": [{"x1": x1, "x2": x2}]})
    assert r.status_code == 200
    assert r.json() == {"instances": [{"y": (np.array(x1) + np.array(x2)).tolist()}]}


def test_typed_b64_tensors_and_several_instances(add_server) -> None:
    _, rest, _ = add_server
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((2, 2)).astype(np.float32), rng.standard_normal((2, 2)).astype(np.float32))
             for _ in range(3)]
    body = {"instances": [{"x1": {"b64": b64(a), "type": "fp32", "shape": [2, 2]},
                           "x2": {"b64": b64(b), "type": "float32", "shape": [2, 2]}} for a, b in pairs]}
    r = rest.post("/model/add:add_common", body)
    assert r.status_code == 200
    got = [np.array(inst["y"], dtype=np.float32) for inst in r.json()["instances"]]
    assert len(got) == 3
    for (a, b), y in zip(pairs, got):
        np.testing.assert_allclose(y, a + b, rtol=1e-6)


def test_single_object_shorthand_and_version_url(add_server) -> None:
    _, rest, _ = add_server
    body = {"instances": {"x1": [[1.0, 1.0], [1.0, 1.0]], "x2": [[2.0, 2.0], [2.0, 2.0]]}}
    for url in ("/model/add:add_common", "/model/add/version/1:add_common", "/model/add/version/0:add_common"):
        r = rest.post(url, body)
        assert r.status_code == 200, url
        assert r.json() == {"instances": [{"y": [[3.0, 3.0], [3.0, 3.0]]}]}


def test_add_cast_accepts_ints(add_server) -> None:
    _, rest, _ = add_server
    r = rest.post("/model/add:add_cast", {"instances": [{"x1": [[1, 2], [3, 4]], "x2": [[5, 6], [7, 8]]}]})
    assert r.json() == {"instances": [{"y": [[6.0, 8.0], [10.0, 12.0]]}]}


@pytest.mark.parametrize(("path", "body", "status", "fragment"), [
    ("/model/add:add_common", {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]]}]}, 400,
     "Cannot find input x2 in instance input , servable add, method add_common"),
    ("/model/add:add_common", {"instances": [{"x1": [[1, 2], [3, 4]], "x2": [[1, 2], [3, 4]]}]}, 400,
     "Given model input 0 data type int32 not match the data type float32 defined in model"),
    ("/model/add:add_common", {"instances": [{"x1": [1.0, 2.0, 3.0], "x2": [[1.0, 2.0], [3.0, 4.0]]}]}, 400,
     "Given model input 0 size 12 not match the size 16 defined in model"),
    ("/model/add:add_common", b'{"instances": [{"x1": ', 400, "Illegal JSON format."),
    ("/model/add:add_common", b"", 400, "http message invalid"),
    ("/model/nothere:add_common", {"instances": [{"x1": 1.0}]}, 404,
     "Request servable(nothere) method(add_common) , servable is not available"),
    ("/model/add:nomethod", {"instances": [{"x1": 1.0}]}, 404,
     "Request servable(add) method(nomethod) , method is not available"),
    ("/model/add/version/7:add_common", {"instances": [{"x1": 1.0}]}, 404, "servable is not available"),
    ("/model/add/version/x:add_common", {"instances": [{"x1": 1.0}]}, 400,
     "please check url, the keyword:[version] value invalid"),
    ("/model/add", {"instances": [{"x1": 1.0}]}, 400, "please check url, the keyword:[service method] must contain."),
    ("/model/add:add_common", {"instance": [{"x1": 1.0}]}, 400, "key 'instances' expects to exist once"),
    ("/model/add:add_common", {"instances": []}, 400, "instances value is array type, but no value"),
    ("/model/add:add_common", {"instances": [{"x1": {"b64": "@@@", "type": "fp32"}, "x2": 1.0}]}, 400,
     "is illegal b64 encode string"),
    # found by the REST fuzz test: a string into add_cast's preprocess (was a 500)
    ("/model/add:add_cast", {"instances": {"x1": [[0.0, 0.0], [0.0, 0.0]], "x2": ""}}, 400,
     "Call Function 'add.add_trans_datatype' Failed, method: 'add_cast', stage index(begin with 1): 1"),
])
def test_error_bodies(add_server, path, body, status, fragment) -> None:
    _, rest, _ = add_server
    r = rest.post(path, body)
    assert r.status_code == status, r.text
    payload = r.json()
    assert set(payload) == {"error_msg"}
    assert fragment in payload["error_msg"]


def test_per_instance_error_keeps_other_instances(add_server) -> None:
    _, rest, _ = add_server
    good = {"x1": [[1.0, 1.0], [1.0, 1.0]], "x2": [[1.0, 1.0], [1.0, 1.0]]}
    bad = {"x1": [[1, 1], [1, 1]], "x2": [[1, 1], [1, 1]]}  # int32 into the float32 model
    r = rest.post("/model/add:add_common", {"instances": [good, bad, good]})
    assert r.status_code == 200
    out = r.json()["instances"]
    assert out[0] == out[2] == {"y": [[2.0, 2.0], [2.0, 2.0]]}
    assert "data type int32 not match" in out[1]["error_msg"]


def test_only_post(add_server) -> None:
    _, rest, _ = add_server
    r = rest.client.get("/model/add:add_common")
    assert r.status_code == 405
    assert r.json() == {"error_msg": "http message only support POST right now"}


def test_health_ready_metrics(add_server) -> None:
    _, rest, _ = add_server
    assert rest.get("/health").status_code == 200
    ready = rest.get("/ready")
    assert ready.status_code == 200 and ready.json()["servables"]["add"]["ready"] is True
    metrics = rest.get("/metrics").text
    assert "servable_requests_total" in metrics and 'servable_ready{servable="add"} 1.0' in metrics


def test_zmq_client_matches_rest(add_server) -> None:
    _, rest, zmq_address = add_server
    x1 = np.arange(4, dtype=np.float32).reshape(2, 2)
    x2 = np.full((2, 2), 0.5, np.float32)
    with Client(zmq_address, "add", "add_common") as client:
        result = client.infer([{"x1": x1, "x2": x2}, {"x1": x2, "x2": x2}])
    assert isinstance(result, list) and len(result) == 2
    assert result[0]["y"].dtype == np.float32 and result[0]["y"].shape == (2, 2)
    np.testing.assert_array_equal(result[0]["y"], x1 + x2)
    np.testing.assert_array_equal(result[1]["y"], x2 + x2)
    via_rest = rest.post("/model/add:add_common", {"instances": [{"x1": x1.tolist(), "x2": x2.tolist()}]}).json()
    np.testing.assert_array_equal(np.array(via_rest["instances"][0]["y"], np.float32), result[0]["y"])


def test_zmq_client_errors(add_server) -> None:
    _, _, zmq_address = add_server
    ok = np.ones((2, 2), np.float32)
    with Client(zmq_address, "add", "add_common") as client:
        whole = client.infer([{"x1": ok}])
        assert isinstance(whole, dict) and "Cannot find input x2" in whole["error"]
        mixed = client.infer([{"x1": ok, "x2": ok}, {"x1": ok.astype(np.int32), "x2": ok.astype(np.int32)}])
        assert isinstance(mixed, list)
        np.testing.assert_array_equal(mixed[0]["y"], ok + ok)
        assert "data type int32 not match" in mixed[1]["error"]
        async_result = client.infer_async({"x1": ok, "x2": ok}).result()
        np.testing.assert_array_equal(async_result[0]["y"], ok + ok)
    with Client(zmq_address, "nope", "add_common") as client:
        assert "servable is not available" in client.infer({"x1": ok})["error"]
    with pytest.raises(RuntimeError, match="Not support value type"):
        Client(zmq_address, "add", "add_common").infer({"x1": [1, 2]})


def test_zmq_client_down_server_errors_quickly() -> None:
    from tests.support.procs import free_port

    start = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", "add", "add_common", connect_timeout_s=1.0) as client:
        result = client.infer({"x1": np.ones((2, 2), np.float32)})
    assert "unavailable" in result["error"]
    assert time.monotonic() - start < 10
