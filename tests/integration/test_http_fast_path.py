"""Main's HTTP protocol answers MindSpore's predict from the parser (`servable_framework.main.fast_http`): the
same answers as uvicorn's ASGI route, HTTP/1.1 connection rules kept (pipelining in order, ``Connection:
close``, HTTP/1.0), and a client that hangs up cancels its request. Real Main and Worker processes, raw sockets."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from servable_framework.client import Client
from tests.support.procs import free_port, wait_until

SERVABLES = Path(__file__).resolve().parents[1] / "support" / "servables"
ADD = "/model/add:add_common"
GOOD = json.dumps({"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[0.5, 0.5], [0.5, 0.5]]}]}).encode()
EXPECTED = {"instances": [{"y": [[1.5, 2.5], [3.5, 4.5]]}]}


@pytest.fixture(scope="module")
def server(module_servers, add_dir, tmp_path_factory):
    """One Main serving `add` (the tensor_add example) and `failover_echo` (a stage that can sleep)."""
    from tests.support.procs import Rest, child_env

    echo_root = tmp_path_factory.mktemp("echo")
    shutil.copytree(SERVABLES / "failover_echo", echo_root / "failover_echo",
                    ignore=shutil.ignore_patterns("__pycache__"))
    port, zmq_port = free_port(), free_port()
    proc = module_servers.start(["-m", "tests.support.serve", "local", "--dir", str(add_dir), "--name", "add",
                                 "--rest", f"127.0.0.1:{port}", "--zmq", f"127.0.0.1:{zmq_port}", "--device-ids", "0",
                                 "--also-local", str(echo_root), "failover_echo"], "server-fast-http", env=child_env())
    rest = Rest(port)
    rest.wait_ready(proc, 120)
    yield port, rest, f"127.0.0.1:{zmq_port}"
    rest.close()


def request(path: str, body: bytes, *, version: bytes = b"1.1", extra: bytes = b"", chunked: bool = False,
            method: bytes = b"POST") -> bytes:
    head = b"%s %s HTTP/%s\r\nHost: t\r\nContent-Type: application/json\r\n%s" % (method, path.encode(), version,
                                                                                extra)
    if chunked:
        half = len(body) // 2
        parts = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]) if p)
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + parts + b"0\r\n\r\n"
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def exchange(port: int, data: bytes, count: int, timeout_s: float = 30) -> tuple[list[tuple[int, dict, bytes]], bool]:
    """Send ``data`` on one connection and read ``count`` responses (each framed by its Content-Length, as
    every answer of this server is): [(status, headers, body)], and whether the server then closed the
    connection."""
    out: list[tuple[int, dict, bytes]] = []
    buf = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)

        def more() -> bool:
            nonlocal buf
            chunk = sock.recv(65536)
            buf += chunk
            return bool(chunk)

        while len(out) < count:
            while b"\r\n\r\n" not in buf:
                assert more(), f"closed after {len(out)} responses"
            head, buf = buf.split(b"\r\n\r\n", 1)
            status_line, *lines = head.decode("latin-1").split("\r\n")
            assert status_line.startswith("HTTP/1.1 "), status_line
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            size = int(headers["content-length"])
            while len(buf) < size:
                assert more(), "closed mid-body"
            out.append((int(status_line.split()[1]), headers, buf[:size]))
            buf = buf[size:]
        assert buf == b"", buf
        sock.settimeout(2)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
    return out, closed


def direct(rest) -> float:
    """`servable_http_direct_requests_total`: the requests Main's HTTP protocol answered itself."""
    for line in rest.get("/metrics").text.splitlines():
        if line.startswith("servable_http_direct_requests_total "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("servable_http_direct_requests_total is not in /metrics")


def test_answers_match_the_asgi_route(server) -> None:
    """A chunked body is not taken by the fast path (no Content-Length): uvicorn's ASGI route answers it.
    Both answer every body alike: status, body and content type. The counter shows which route answered."""
    port, rest, _ = server
    bodies = [GOOD, b"{not json", b'{"instances": []}', b'{"instances": [{"x1": [[1.0]], "x2": [[1.0]]}]}',
              b"", json.dumps({"instances": [{"x1": [[1, 2], [3, 4]], "x2": [[1, 2], [3, 4]]}]}).encode()]
    for body in bodies:
        before = direct(rest)
        fast, _ = exchange(port, request(ADD, body), 1)
        assert direct(rest) == before + 1, body
        if body:
            slow, _ = exchange(port, request(ADD, body, chunked=True), 1)
        else:  # an empty chunked body is just the terminator
            slow, _ = exchange(port, request(ADD, body, extra=b"Transfer-Encoding: chunked\r\n", chunked=False)
                               .replace(b"Content-Length: 0\r\n", b"") + b"0\r\n\r\n", 1)
        assert direct(rest) == before + 1, body  # the chunked one took the ASGI route
        assert fast[0][0] == slow[0][0], (body, fast, slow)
        assert json.loads(fast[0][2]) == json.loads(slow[0][2]), body
        assert fast[0][1]["content-type"] == slow[0][1]["content-type"] == "application/json"
    assert json.loads(exchange(port, request(ADD, GOOD), 1)[0][0][2]) == EXPECTED
    status, _, body = exchange(port, request(ADD, b"{not json"), 1)[0][0]
    assert status == 400 and "Illegal JSON format" in json.loads(body)["error_msg"]


def test_pipelined_requests_are_answered_in_order(server) -> None:
    """Predicts (fast path), a GET (the app) and a chunked predict (the app) sent at once on one connection are
    answered in the order they were sent."""
    port, _, _ = server
    second = json.dumps({"instances": [{"x1": [[1.0, 1.0], [1.0, 1.0]], "x2": [[1.0, 1.0], [1.0, 1.0]]}]}).encode()
    data = (request(ADD, GOOD) + request("/health", b"", method=b"GET") + request(ADD, second)
            + request(ADD, GOOD, chunked=True) + request(ADD, b"{bad"))
    out, closed = exchange(port, data, 5)
    assert [s for s, _, _ in out] == [200, 200, 200, 200, 400]
    assert json.loads(out[0][2]) == EXPECTED
    assert json.loads(out[1][2]) == {"status": "alive"}
    assert json.loads(out[2][2]) == {"instances": [{"y": [[2.0, 2.0], [2.0, 2.0]]}]}
    assert json.loads(out[3][2]) == EXPECTED
    assert "Illegal JSON format" in json.loads(out[4][2])["error_msg"]
    assert not closed  # keep-alive


@pytest.mark.parametrize("how", ["connection_close", "http_1_0"])
def test_closing_requests_are_answered_then_closed(server, how) -> None:
    """``Connection: close`` is answered directly, then closed; HTTP/1.0 takes the ASGI route."""
    port, rest, _ = server
    data = request(ADD, GOOD, extra=b"Connection: close\r\n") if how == "connection_close" \
        else request(ADD, GOOD, version=b"1.0")
    before = direct(rest)
    out, closed = exchange(port, data, 1)
    assert out[0][0] == 200 and json.loads(out[0][2]) == EXPECTED
    assert closed
    assert direct(rest) == before + (1 if how == "connection_close" else 0)


def cancelled(rest) -> float:
    for line in rest.get("/metrics").text.splitlines():
        if line.startswith("servable_requests_finished_total{") and 'servable="failover_echo"' in line \
                and 'outcome="cancelled"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def inflight(rest) -> float:
    for line in rest.get("/metrics").text.splitlines():
        if line.startswith("servable_requests_inflight "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_hangs_up_cancels_its_request(server) -> None:
    """The request (held 5 s in its stage) ends as cancelled as soon as its client hangs up, long before its
    stage would have let it finish; the server keeps answering."""
    port, rest, _ = server
    before = cancelled(rest)
    body = json.dumps({"instances": [{"x": [1.0, 2.0], "sleep_ms": 5000}]}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request("/model/failover_echo:echo", body))
    wait_until(lambda: inflight(rest) == 1, 10, "the request to be in flight")
    start = time.monotonic()
    sock.close()
    wait_until(lambda: cancelled(rest) == before + 1, 10, "the hang-up to cancel the request")
    assert time.monotonic() - start < 4, "counted only when the stage ended: the hang-up was not noticed"
    out, _ = exchange(port, request(ADD, GOOD), 1)
    assert json.loads(out[0][2]) == EXPECTED


def busy_polls(rest) -> dict[str, float]:
    """`servable_busy_polls_total` by how the spins ended."""
    out = {"event": 0.0, "budget": 0.0}
    for line in rest.get("/metrics").text.splitlines():
        if line.startswith("servable_busy_polls_total{"):
            out[line.split('ended="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_main_busy_polls_only_for_a_quick_method(server) -> None:
    """While the one request in flight is in its Worker, Main polls for the answer (`servable_framework.busy_poll`)
    when that Worker answered the method within the budget (1 ms by default) last time: the tensor_add requests
    are polled for, and answers end the spins. ``echo`` held 30 ms in its stage is waited for asleep: only its
    first request, before its time is known, may spin."""
    port, rest, _ = server
    before = busy_polls(rest)
    # back to back on one connection, as a client under load sends them (after an idle pause, a process's
    # wake-up alone may take a millisecond on a VM: then the Worker's answer comes after the budget)
    # (the first answer is slower: it makes the Worker's caches)
    assert json.loads(exchange(port, request(ADD, GOOD), 1)[0][0][2]) == EXPECTED
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(100):
            connection.request("POST", ADD, GOOD, {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read()) == EXPECTED
    finally:
        connection.close()
    quick = busy_polls(rest)
    assert quick["event"] > before["event"], (before, quick)
    body = json.dumps({"instances": [{"x": [1.0, 2.0], "sleep_ms": 30}]}).encode()
    for _ in range(8):
        assert exchange(port, request("/model/failover_echo:echo", body), 1)[0][0][0] == 200
    slow = busy_polls(rest)
    assert sum(slow.values()) - sum(quick.values()) <= 1, (quick, slow)


ZMQ_OK = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
ZMQ_CALLS: list[Any] = [  # instances for `Client.infer`: answered, refused whole, failed per instance
    {"x1": ZMQ_OK, "x2": ZMQ_OK},
    [{"x1": ZMQ_OK, "x2": ZMQ_OK * 2}, {"x1": ZMQ_OK[:1], "x2": ZMQ_OK[:1]}],
    [{"x1": ZMQ_OK, "x2": ZMQ_OK}, {"x1": ZMQ_OK}],  # an input missing: the request is refused
    [{"x1": ZMQ_OK, "x2": ZMQ_OK}, {"x1": ZMQ_OK.astype(np.int32), "x2": ZMQ_OK.astype(np.int32)}],
    [{"x1": ZMQ_OK.astype(np.int32), "x2": ZMQ_OK.astype(np.int32)}] * 2,  # every instance fails alike
    [],
    [{"x1": ZMQ_OK, "x2": ZMQ_OK}] * 1025,  # over max_instances_per_request
    {"x1": ZMQ_OK, "x2": "text"},
]
ZMQ_RAW: list[dict[str, Any]] = [  # request headers a Client would not build: malformed descriptors
    {"instances": [{"x1": {"t": "nd", "dtype": "float32", "shape": [2, 2], "buf": 5}}]},
    {"instances": [{"x1": {"t": "nd", "dtype": "float32", "shape": [3, 3], "buf": 0}}]},
    {"instances": [{"x1": {"t": "nd", "dtype": "complex64", "shape": [2], "buf": 0}}]},
    {"instances": [{"x1": {"t": "weird"}}]},
    {"instances": {"x1": 1}},
    {"instances": ["x1"]},
]


def answers(rest_port: int, zmq_address: str) -> list[Any]:
    """What a server answers to REST bodies (status and JSON), Client calls and raw ZMQ requests, in order."""
    out: list[Any] = []
    bodies = [GOOD, b"{not json", b'{"instances": []}', b'{"instances": [{"x1": [[1.0]]}]}',
              json.dumps({"instances": [{"x1": [[1, 2], [3, 4]], "x2": [[1, 2], [3, 4]]}]}).encode(),
              json.dumps({"instances": [{"x1": [[1.0, 2.0]], "x2": [[1.0, 2.0]]}, {"x1": "x", "x2": "y"}]}).encode()]
    for body in bodies:
        status, _, data = exchange(rest_port, request(ADD, body), 1)[0][0]
        out.append((status, json.loads(data)))
    with Client(zmq_address, "add", "add_common", timeout_s=30) as client:
        for call in ZMQ_CALLS:
            reply = client.infer(call)
            out.append(reply if isinstance(reply, dict) else
                       [{k: (v.dtype.name, v.tolist()) if isinstance(v, np.ndarray) else v for k, v in inst.items()}
                        for inst in reply])
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://{zmq_address}")
    try:
        for i, fields in enumerate(ZMQ_RAW):
            header = {"v": 1, "id": 100 + i, "servable": "add", "method": "add_common", **fields}
            dealer.send_multipart([b"P", msgpack.packb(header, use_bin_type=True), ZMQ_OK.tobytes()])
            assert dealer.poll(30_000), "no reply"
            kind, raw, *_ = dealer.recv_multipart()
            out.append((kind, msgpack.unpackb(raw)))
    finally:
        dealer.close(0)
        ctx.term()
    return out


def test_hot_path_off_gives_the_same_answers(server, servers, add_dir) -> None:
    """With every hot-path setting off (``SERVABLE_HTTP_DIRECT=0``: uvicorn's stock protocol and the ASGI app;
    ``SERVABLE_FORWARD_REQUESTS=0``: Main decodes REST bodies and ZMQ instances itself; ``SERVABLE_BUSY_POLL_US=0``)
    a server gives the same answers as one with them on (the module's server): REST bodies, Client calls and
    malformed ZMQ requests alike, errors included. And the off server answers none of them from Main's own
    protocol and never busy-polls."""
    from tests.support.procs import Rest, child_env

    port, _, zmq_address = server
    off_port, off_zmq = free_port(), free_port()
    proc = servers.start(["-m", "tests.support.serve", "local", "--dir", str(add_dir), "--name", "add",
                          "--rest", f"127.0.0.1:{off_port}", "--zmq", f"127.0.0.1:{off_zmq}", "--device-ids", "0"],
                         "server-hot-path-off", env=child_env(SERVABLE_HTTP_DIRECT="0", SERVABLE_BUSY_POLL_US="0",
                                                              SERVABLE_FORWARD_REQUESTS="0"))
    rest = Rest(off_port)
    try:
        rest.wait_ready(proc, 120)
        on = answers(port, zmq_address)
        off = answers(off_port, f"127.0.0.1:{off_zmq}")
        assert on[0] == (200, EXPECTED)
        assert len(on) == len(off)
        for i, (a, b) in enumerate(zip(on, off)):
            assert a == b, (i, a, b)
        assert direct(rest) == 0
        assert busy_polls(rest) == {"event": 0.0, "budget": 0.0}
    finally:
        rest.close()
