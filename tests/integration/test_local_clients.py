"""`Client.infer` on the server's host goes over Main's unix socket for local Clients (`ZmqFrontend.start_local`)
instead of ZMQ, against real Main + Worker processes.

Checked: a loopback Client asks for the socket once and gets right answers over it (many threads too); a
Client of a non-loopback address never asks; a socket path that is gone sends the call over ZMQ and makes the
Client ask again; after a timed-out call the next gets its own answer; garbage and
an oversize declaration on the socket close only that connection, and the server keeps serving.
"""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest

from servable_framework.client import Client
from tests.integration.test_limits import make_slow_dir

X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)


@pytest.fixture(scope="module")
def add_server(module_servers, add_dir):
    proc, rest, address = module_servers.local(add_dir, "add")
    yield proc, address
    rest.close()


def _add(client: Client, k: float = 0.0):
    got = client.infer({"x1": X + k, "x2": X})
    assert isinstance(got, list), got
    np.testing.assert_array_equal(got[0]["y"], X + k + X)


def test_a_local_client_calls_over_the_unix_socket(add_server) -> None:
    proc, address = add_server
    with Client(address, "add", "add_common", timeout_s=10) as client:
        _add(client)
        path = client._local_path
        assert path and path.endswith("/clients"), path
        unix = client._local.unix
        assert unix.sock is not None and unix.path == path
        for k in range(5):
            _add(client, k)
        assert client._local.unix is unix and unix.sock is not None  # the same connection throughout

        failures: list[str] = []

        def work(k: int) -> None:
            try:
                for i in range(20):
                    _add(client, 10 * k + i)
            except AssertionError as exc:
                failures.append(str(exc))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures, failures
        assert len(client._unix) == 5  # one socket per calling thread


def test_a_remote_address_never_asks(add_server) -> None:
    _, address = add_server
    port = address.rsplit(":", 1)[1]
    # this host's own non-loopback address, if it has one: a Client of it is not "local" by its address
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            own = probe.getsockname()[0]
    except OSError:
        pytest.skip("no non-loopback address")
    with Client(f"{own}:{port}", "add", "add_common", timeout_s=3, connect_timeout_s=1) as client:
        assert client._local_path == ""


def test_a_gone_socket_falls_back_to_zmq_and_asks_again(add_server) -> None:
    _, address = add_server
    with Client(address, "add", "add_common", timeout_s=10) as client:
        _add(client)
        real = client._local_path
        client._local_path = real + "-gone"  # as after a Main restart: its folder is another one
        _add(client)  # over ZMQ
        assert client._local_path is None
        _add(client)  # asked again
        assert client._local_path == real


def test_after_a_timed_out_call_the_next_gets_its_own_answer(module_servers, tmp_path_factory) -> None:
    root = make_slow_dir(tmp_path_factory.mktemp("slow_local"))
    proc, rest, address = module_servers.local(root, "slow")
    try:
        with Client(address, "slow", "sleep", timeout_s=0.5) as client:
            got = client.infer({"secs": np.float32(0.0)})
            assert isinstance(got, list), got
            unix = client._local.unix
            got = client.infer({"secs": np.float32(3.0)})
            assert isinstance(got, dict) and "error" in got, got
            client.timeout_s = 10
            got = client.infer({"secs": np.float32(0.0)})  # the late answer of the last call is not this one
            assert isinstance(got, list) and float(got[0]["y"]) == 0.0, got
            assert client._local.unix is unix and unix.sock is not None
    finally:
        rest.close()
        proc.stop()


def _raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


def test_garbage_on_the_socket_closes_only_that_connection(add_server) -> None:
    proc, address = add_server
    with Client(address, "add", "add_common", timeout_s=10) as client:
        _add(client)
        path = client._local_path
        bad = _raw(path)
        bad.sendall(struct.pack("<I", 0))  # a zero frame count
        assert _closed(bad)
        huge = _raw(path)
        huge.sendall(struct.pack("<IQ", 1, 5) + b"ident" + struct.pack("<IQ", 1, 1 << 40))  # 1 TiB declared
        assert _closed(huge)
        junk = _raw(path)
        junk.sendall(struct.pack("<IQ", 1, 5) + b"ident" + struct.pack("<IQQ", 2, 1, 3) + b"Pxyz")  # bad header
        reply = junk.recv(4096)
        assert b"malformed" in reply, reply
        junk.close()
        _add(client)  # the good connection still works
    assert proc.alive()
