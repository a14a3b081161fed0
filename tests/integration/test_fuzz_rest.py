"""Property test of the REST front end against ONE real `add` server (Main + Worker processes).

Thousands of generated requests (arbitrary bytes, arbitrary JSON, MindSpore-shaped ``{"instances": [...]}``
bodies with random values and b64 tensors of random type/shape, random URLs under ``/model/``, random HTTP
methods) must each get a non-5xx answer whose JSON body has exactly one key, ``instances`` or
``error_msg``, and must never take the server down. Afterwards the server still computes correctly.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

URLS_VALID = ["/model/add:add_common", "/model/add:add_cast", "/model/add/version/1:add_common",
              "/model/add/version/0:add_cast"]
B64_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "fp16", "float16",
             "fp32", "float32", "fp64", "float64", "bool"]
ITEMSIZE = {"int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
            "fp16": 2, "float16": 2, "fp32": 4, "float32": 4, "fp64": 8, "float64": 8, "bool": 1}

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                      HealthCheck.data_too_large],
                database=None, derandomize=False, print_blob=True)


@pytest.fixture(scope="module")
def fuzz_server(module_servers, add_dir):
    proc, rest, _ = module_servers.local(add_dir, "add")
    # One new connection per request: Main's REST sockets lack TCP_NODELAY (see test_keep_alive_latency), so a
    # keep-alive connection pays Nagle + delayed ACK (~40 ms) on every response; a fresh one does not.
    client = httpx.Client(base_url=rest.base, timeout=20.0, limits=httpx.Limits(max_keepalive_connections=0))
    yield proc, client
    client.close()
    rest.close()


def check(proc: Any, response: httpx.Response, what: object, in_hypothesis: bool = True) -> dict[str, Any]:
    """The invariant: no 5xx, a JSON object with exactly `instances` or `error_msg`, the server alive."""
    if in_hypothesis:
        event(f"HTTP {response.status_code}")  # shown by --hypothesis-show-statistics
    assert response.status_code < 500, (what, response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), (what, response.headers)
    body = response.json()
    assert isinstance(body, dict) and set(body) in ({"instances"}, {"error_msg"}), (what, body)
    if "error_msg" in body:
        assert isinstance(body["error_msg"], str) and body["error_msg"], (what, body)
        assert response.status_code >= 400, (what, response.status_code, body)
    else:
        assert response.status_code == 200, (what, response.status_code, body)
        assert isinstance(body["instances"], list) and body["instances"], (what, body)
        for item in body["instances"]:
            assert isinstance(item, dict) and (set(item) == {"y"} or set(item) == {"error_msg"}), (what, body)
    assert proc.alive(), f"server died on {what!r}"
    return body


# --------------------------------------------------------------------------------------------- strategies

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats() | st.floats(width=32) | st.text(max_size=12))
json_values = st.recursive(json_scalars,
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=10)

leaf = (st.integers(min_value=-2**33, max_value=2**33) | st.floats(width=32) | st.floats() | st.booleans()
        | st.text(max_size=6))
nested_arrays = st.recursive(leaf, lambda c: st.lists(c, min_size=0, max_size=4), max_leaves=12)
float_2x2 = st.lists(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=2, max_size=2),
                     min_size=2, max_size=2)
int_2x2 = st.lists(st.lists(st.integers(-2**31, 2**31 - 1), min_size=2, max_size=2), min_size=2, max_size=2)


@st.composite
def b64_tensor(draw: st.DrawFn) -> dict[str, Any]:
    """A b64 object whose byte size usually matches its type and shape, sometimes not."""
    type_name = draw(st.sampled_from(B64_TYPES))
    shape = draw(st.one_of(st.just([2, 2]), st.lists(st.integers(0, 4), max_size=3)))
    count = int(np.prod(shape)) if shape else 1
    size = count * ITEMSIZE[type_name] + draw(st.sampled_from([0, 0, 0, 1, -1]))
    raw = draw(st.binary(min_size=max(size, 0), max_size=max(size, 0)))
    obj: dict[str, Any] = {"b64": base64.b64encode(raw).decode(), "type": type_name, "shape": shape}
    if draw(st.integers(0, 5)) == 0:
        del obj["shape"]
    return obj


b64_wild = st.fixed_dictionaries(
    {},
    optional={
        "b64": st.one_of(st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=12),
                         json_scalars),
        "type": st.one_of(st.sampled_from([*B64_TYPES, "str", "bytes", "", "complex64", "bfloat16"]),
                          st.text(max_size=8), json_scalars),
        "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=6), st.lists(st.integers(0, 3), max_size=40),
                           json_values),
        "extra": json_scalars,
    },
)
text_b64 = st.builds(lambda t, s, kind: {"b64": base64.b64encode(s.encode()).decode(), "type": kind, "shape": t},
                     st.sampled_from([[], [1], [1, 1], [2]]), st.text(max_size=10), st.sampled_from(["str", "bytes"]))

values = st.one_of(float_2x2, int_2x2, nested_arrays, json_scalars, b64_tensor(), b64_wild, text_b64,
                   st.lists(b64_tensor() | text_b64 | b64_wild, min_size=1, max_size=3), json_values)
input_names = st.sampled_from(["x1", "x2"]) | st.text(max_size=4)
instance = st.dictionaries(input_names, values, max_size=4)
good_instance = st.fixed_dictionaries({"x1": float_2x2 | b64_tensor(), "x2": float_2x2 | b64_tensor()})
documents = st.one_of(
    st.fixed_dictionaries({"instances": st.lists(good_instance | instance, min_size=1, max_size=5)}),
    st.fixed_dictionaries({"instances": st.lists(instance | json_values, max_size=5)}),
    st.fixed_dictionaries({"instances": good_instance | instance | json_values}),
    st.dictionaries(st.sampled_from(["instances", "instance", "x1", ""]), json_values, max_size=3),
)


def encode(doc: Any, how: int) -> bytes:
    text = json.dumps(doc, ensure_ascii=how != 1)
    if how == 2:  # a repeated top-level key
        text = text.replace("{", '{"instances": [], ', 1) if text.startswith("{") else text
    if how == 3:  # truncated
        text = text[: max(len(text) - 7, 0)]
    data = text.encode("utf-8", "surrogatepass")
    return b"\xef\xbb\xbf" + data if how == 4 else data


@st.composite
def random_url(draw: st.DrawFn) -> str:
    def part(s: str) -> str:
        return quote(s, safe=":").replace(".", "%2E")

    # a newline inside the path is left out here: test_newline_in_url_path covers it (a known bug)
    # surrogates are left out: they are not UTF-8, so no client can put them in a URL (quote() raises)
    chars = st.characters(exclude_characters="\n", exclude_categories=("Cs",))
    text = st.text(chars, max_size=8)
    segments = draw(st.lists(st.one_of(st.sampled_from(["add", "version", "model", "1", "0", "-1", "4294967295",
                                                        "x", ""]), text), max_size=4))
    url = "/model/" + "/".join(part(s) for s in segments)
    if draw(st.booleans()):
        url += ":" + part(draw(st.sampled_from(["add_common", "add_cast", "", "::"]) | text))
    if draw(st.integers(0, 4)) == 0:
        url += "?" + quote(draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=6)))
    return url


# --------------------------------------------------------------------------------------------- properties


@settings(FUZZ, max_examples=600)
@given(body=st.binary(max_size=300) | st.sampled_from([b"", b"null", b"[]", b"{}", b'"\\ud800"', b"NaN", b"1e999",
                                                        b'{"instances": [{"x1": "\\ud800"}]}', b"[" * 5000]))
def test_arbitrary_bytes(fuzz_server, body: bytes) -> None:
    proc, client = fuzz_server
    r = client.post("/model/add:add_common", content=body)
    check(proc, r, body)


@settings(FUZZ, max_examples=400)
@given(doc=json_values, how=st.integers(0, 4))
def test_arbitrary_json(fuzz_server, doc: Any, how: int) -> None:
    proc, client = fuzz_server
    body = encode(doc, how)
    r = client.post("/model/add:add_cast", content=body)
    check(proc, r, body)


@settings(FUZZ, max_examples=1000)
@given(doc=documents, url=st.sampled_from(URLS_VALID), how=st.sampled_from([0, 0, 0, 0, 1, 2, 3, 4]))
def test_instances_shaped_bodies(fuzz_server, doc: Any, url: str, how: int) -> None:
    proc, client = fuzz_server
    body = encode(doc, how)
    r = client.post(url, content=body)
    check(proc, r, (url, body))


@settings(FUZZ, max_examples=400)
@given(url=random_url() | st.sampled_from(URLS_VALID), method=st.sampled_from(["POST", "POST", "GET", "PUT",
                                                                               "DELETE", "PATCH"]),
       doc=st.one_of(good_instance.map(lambda i: {"instances": [i]}), documents))
def test_random_urls_and_methods(fuzz_server, url: str, method: str, doc: Any) -> None:
    proc, client = fuzz_server
    r = client.request(method, url, content=json.dumps(doc).encode())
    body = check(proc, r, (method, url))
    if method != "POST":
        assert r.status_code == 405 and body == {"error_msg": "http message only support POST right now"}


@pytest.mark.parametrize("url", ["/model/%0A/add", "/model/add%0A:add_common", "/model/add/version/%0A1:add_common"])
def test_newline_in_url_path(fuzz_server, url: str) -> None:
    proc, client = fuzz_server
    r = client.post(url, json={"instances": [{"x1": 1.0}]})
    body = check(proc, r, url, in_hypothesis=False)
    assert set(body) == {"error_msg"} and r.status_code in (400, 404), (r.status_code, body)


def test_keep_alive_latency(fuzz_server) -> None:
    proc, fresh = fuzz_server
    with httpx.Client(base_url=fresh.base_url, timeout=20.0) as client:  # keep-alive: one connection
        client.get("/health")
        took = []
        for _i in range(15):
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            took.append(time.perf_counter() - start)
    assert proc.alive()
    assert sorted(took)[len(took) // 2] < 0.02, f"median {sorted(took)[len(took) // 2] * 1000:.1f} ms per request"


def test_server_still_correct_after_fuzzing(fuzz_server) -> None:
    proc, client = fuzz_server
    rng = np.random.default_rng(7)
    x1 = rng.standard_normal((2, 2)).astype(np.float32)
    x2 = rng.standard_normal((2, 2)).astype(np.float32)
    r = client.post("/model/add:add_common", json={"instances": [{"x1": x1.tolist(), "x2": x2.tolist()}]})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.array(r.json()["instances"][0]["y"], np.float32), x1 + x2)
    assert client.get("/ready").status_code == 200
    assert proc.alive()
