"""Malformed traffic on the ZMQ links, both ways, with real sockets.

* The front end (one real `add` server, Main + Worker): generated messages — random frames, truncated headers,
  wrong kinds, wrong protocol versions, descriptors with bad buffer indices and huge declared shapes — each get
  an error reply (or, for CANCEL, nothing), and the server process neither crashes nor stops computing correctly.
* The Client (against a scripted ROUTER in this test): a call answered with a malformed reply, or whose
  connection is lost, fails within a second with a clear error instead of waiting for its 600 s local deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servable_framework.client import Client, StreamError
from tests.support.procs import free_port

OK = np.ones((2, 2), np.float32)
FUZZ = settings(deadline=None, max_examples=300, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry: larger ints fail in the test, not the server


def _header(**fields: Any) -> bytes:
    return msgpack.packb({"v": 1, "id": 7, "servable": "add", "method": "add_common", **fields}, use_bin_type=True)


def _nd(shape: Any, buf: Any = 0, dtype: Any = "float32") -> dict[str, Any]:
    return {"t": "nd", "dtype": dtype, "shape": shape, "buf": buf}


@pytest.fixture(scope="module")
def add_front(module_servers, add_dir) -> Iterator[tuple[Any, str]]:
    proc, rest, zmq_address = module_servers.local(add_dir, "add")
    yield proc, zmq_address
    rest.close()


@pytest.fixture(scope="module")
def dealer(add_front) -> Iterator[zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 20_000)
    sock.connect(f"tcp://{add_front[1]}")
    yield sock
    sock.close(0)
    ctx.term()


descriptors = st.one_of(
    st.builds(_nd, st.lists(st.integers(-3, 2**62), max_size=4), st.integers(-2, 4)),
    st.builds(_nd, st.just([2, 2]), st.just(0), st.sampled_from(["float32", "complex64", "object", 5, None])),
    st.builds(_nd, st.one_of(st.none(), st.text(max_size=3), st.just([1.5]))),
    st.fixed_dictionaries({"t": st.sampled_from(["str", "bytes", "x", 3])},
                          optional={"v": st.one_of(st.text(max_size=5), INTS), "buf": st.integers(-1, 3)}),
    INTS, st.text(max_size=4), st.none(),
)
headers = st.one_of(
    st.binary(max_size=64),  # not msgpack at all, or msgpack of anything
    st.builds(lambda inst, extra: _header(instances=inst, **extra),
              st.one_of(st.lists(st.dictionaries(st.sampled_from(["x1", "x2", "y", ""]), descriptors, max_size=3),
                                 max_size=3), INTS, st.text(max_size=3), st.none()),
              st.fixed_dictionaries({}, optional={"v": st.integers(0, 3), "version": st.one_of(st.integers(-2, 3),
                                      st.text(max_size=2)), "timeout_s": st.one_of(st.floats(), st.text(max_size=2)),
                                      "servable": st.one_of(st.text(max_size=4), INTS),
                                      "stream": st.booleans()})),
    st.builds(lambda h, cut: h[:cut], st.just(_header(instances=[{"x1": _nd([2, 2], 0), "x2": _nd([2, 2], 1)}])),
              st.integers(0, 60)),  # truncated
)
messages = st.builds(lambda kind, header, bufs: [kind, header, *bufs],
                     st.one_of(st.sampled_from([b"P", b"K", b"r", b"R", b"X", b"s", b""]), st.binary(max_size=3)),
                     headers, st.lists(st.binary(max_size=32), max_size=3))


def _expect_reply_to(sock: zmq.Socket, rid: int) -> dict[str, Any]:
    """Read replies until the one for request ``rid``; every reply on the way must be a decodable RESULT/STREAM."""
    while True:
        frames = sock.recv_multipart()
        assert frames[0] in (b"r", b"s"), frames[:2]
        header = msgpack.unpackb(frames[1], raw=False)
        if header.get("id") == rid and frames[0] == b"r":
            return header


@FUZZ
@given(frames=st.one_of(messages, st.lists(st.binary(max_size=16), min_size=1, max_size=2)))
def test_front_end_survives_malformed_messages(add_front, dealer, frames: list[bytes]) -> None:
    dealer.send_multipart(frames)
    # a valid request right behind it: its answer proves the front end is alive and still in order
    rid = int(time.monotonic_ns() % 2**31)
    dealer.send_multipart([b"P", _header(id=rid, instances=[{"x1": _nd([2, 2], 0), "x2": _nd([2, 2], 1)}]),
                           OK.tobytes(), OK.tobytes()])
    header = _expect_reply_to(dealer, rid)
    assert header["error_msg"] == [] and len(header["instances"]) == 1, header


def test_front_end_still_serves_after_fuzz(add_front) -> None:
    proc, zmq_address = add_front
    assert proc.alive()
    with Client(zmq_address, "add", "add_common", timeout_s=10) as client:
        out = client.infer({"x1": OK * 3, "x2": OK})
    assert isinstance(out, list) and np.array_equal(out[0]["y"], OK * 4), out


# --- the Client against a scripted server ---------------------------------------------------------------------

# (client id, request id) -> the frames of one message to send, or of several (a list of lists), or None: hang up
Reply = Callable[[bytes, Any], list[bytes] | list[list[bytes]] | None]


class ScriptedServer:
    """A real ROUTER socket on a thread that answers every request with ``reply`` (or closes on None)."""

    def __init__(self, reply: Reply) -> None:
        self.port = free_port()
        self.reply = reply
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://127.0.0.1:{self.port}")
        self.ready.set()
        try:
            while sock.poll(10_000):
                client, kind, header, *_ = sock.recv_multipart()
                rid = msgpack.unpackb(header, raw=False).get("id")
                if kind == b"L":  # a local Client asks for Main's unix socket first: this server has none
                    sock.send_multipart([client, b"L", _reply_header(id=rid, path=None)])
                    continue
                frames = self.reply(client, rid)
                if frames is None:
                    return  # hang up with the call pending
                for message in frames if frames and isinstance(frames[0], list) else [frames]:
                    sock.send_multipart([client, *message])
        finally:
            sock.close(0)
            ctx.term()


def _reply_header(**fields: Any) -> bytes:
    return msgpack.packb({"v": 1, **fields}, use_bin_type=True)


MALFORMED: dict[str, Reply] = {
    "one frame": lambda c, rid: [b"r"],
    "unknown kind": lambda c, rid: [b"?", _reply_header(id=rid)],
    "header not msgpack": lambda c, rid: [b"r", b"\xc1\xff\x00"],
    "header not a map": lambda c, rid: [b"r", msgpack.packb([1, 2])],
    "wrong protocol version": lambda c, rid: [b"r", msgpack.packb({"v": 99, "id": rid})],
    "no request id": lambda c, rid: [b"r", _reply_header(instances=[], error_msg=[])],
    "bad buffer index": lambda c, rid: [b"r", _reply_header(id=rid, instances=[{"y": _nd([2, 2], 5)}],
                                                            error_msg=[])],
    "size mismatch": lambda c, rid: [b"r", _reply_header(id=rid, instances=[{"y": _nd([2, 2], 0)}], error_msg=[]),
                                     b"\0" * 3],
    "short error list": lambda c, rid: [b"r", _reply_header(id=rid, instances=[{}, {}], error_msg=[{"code": 1}])],
    "connection lost": lambda c, rid: None,
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_client_fails_fast_on_a_malformed_reply(case: str) -> None:
    server = ScriptedServer(MALFORMED[case])
    with Client(f"127.0.0.1:{server.port}", "add", "add_common") as client:  # no timeout_s: 600 s local deadline
        start = time.monotonic()
        out = client.infer({"x1": OK, "x2": OK})
        took = time.monotonic() - start
    assert took < 1.0, f"{case}: the call took {took:.2f} s"
    assert isinstance(out, dict) and "error" in out, out
    expected = "unavailable" if case == "connection lost" else "internal"
    assert expected in out["error"] and f"127.0.0.1:{server.port}" in out["error"], out


def test_client_stream_fails_fast_on_a_malformed_piece() -> None:
    server = ScriptedServer(lambda c, rid: [b"s", _reply_header(id=rid, pieces=[{"index": 0, "outputs": {
        "y": _nd([4], 9)}}])])
    with Client(f"127.0.0.1:{server.port}", "add", "add_common") as client:
        start = time.monotonic()
        with pytest.raises(StreamError, match="internal.*malformed reply"):
            list(client.infer_stream({"x1": OK, "x2": OK}))
        assert time.monotonic() - start < 1.0


# --- infer on the caller's own socket --------------------------------------------------------------------------


def test_calls_from_many_threads_each_get_their_own_answer(add_front) -> None:
    """Threads beyond `Client.SYNC_SOCKETS` go through the I/O thread; both kinds of call run at once and every
    answer is the one of its own request."""
    _, zmq_address = add_front
    with Client(zmq_address, "add", "add_common", timeout_s=30) as client:
        client.SYNC_SOCKETS = 2  # 2 threads on their own sockets, 2 through the I/O thread

        def work(seed: int) -> list[bool]:
            results = []
            for i in range(25):
                x = OK * (seed * 100 + i)
                out = client.infer({"x1": x, "x2": OK})
                results.append(isinstance(out, list) and np.array_equal(out[0]["y"], x + OK))
            return results

        with ThreadPoolExecutor(4) as pool:
            assert all(all(r) for r in pool.map(work, range(4)))
        assert len(client._sync) == 2
    out = client.infer({"x1": OK, "x2": OK})
    assert isinstance(out, dict) and "the client was closed" in out["error"], out


def test_a_late_or_foreign_reply_is_not_taken_for_the_call() -> None:
    """The server answers each request with a RESULT of another request id and a STREAM of this one before its
    real RESULT: the caller gets the real one (a late reply of a call that gave up must not answer the next)."""
    def reply(_client: bytes, rid: Any) -> list[list[bytes]]:
        good = _reply_header(id=rid, instances=[{"y": _nd([2, 2], 0)}], error_msg=[])
        other = _reply_header(id=rid + 1000, instances=[{"y": _nd([2, 2], 0)}], error_msg=[])
        return [[b"r", other, (OK * 7).tobytes()], [b"s", _reply_header(id=rid, pieces=[])],
                [b"r", good, (OK * 3).tobytes()]]

    server = ScriptedServer(reply)
    with Client(f"127.0.0.1:{server.port}", "add", "add_common", timeout_s=5) as client:
        for _ in range(3):
            out = client.infer({"x1": OK, "x2": OK})
            assert isinstance(out, list) and np.array_equal(out[0]["y"], OK * 3), out
