"""Large tensors through shared memory between a co-located ZMQ Client and the Worker (`servable_framework.shm`),
against real Main + Worker processes.

Checked: the answers are right for outputs that are inputs passed through (named in place), new outputs (written
into the reply space), outputs too large for it (inline) and small ones; the Worker process really maps the
Client's segment (its /proc/<pid>/maps); many threads at once get their own answers; a call that timed out never
has its segment reused; a server with ``shared_memory=False`` makes the Client fall back to inline tensors with
the same answers; malformed references get errors and the server keeps serving; ``close`` removes the segments.
"""

from __future__ import annotations

import glob
import os
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from servable_framework import shm
from servable_framework.client import Client
from servable_framework.wire import PROTOCOL_VERSION

CONFIG = '''
"""`big`: Python stages over large tensors."""
import time

import numpy as np

from servable_framework.server import register


def same(x):
    return x


def double(x):
    return x * 2


def twice_as_long(x):
    return np.concatenate([x, x])


def later(x, secs):
    time.sleep(float(secs))
    return x


@register.register_method(output_names=["y"])
def echo(x):
    return register.add_stage(same, x, outputs_count=1)


@register.register_method(output_names=["y", "n"])
def scale(x):
    y = register.add_stage(double, x, outputs_count=1)
    return y, register.add_stage(lambda v: np.int64(v.size), x, outputs_count=1)


@register.register_method(output_names=["y"])
def grow(x):
    return register.add_stage(twice_as_long, x, outputs_count=1)


@register.register_method(output_names=["y"])
def slow_echo(x, secs):
    return register.add_stage(later, x, secs, outputs_count=1)
'''

MB = 1 << 20


def _segments() -> set[str]:
    return {os.path.basename(p) for p in glob.glob(os.path.join(shm.SHM_DIR, shm.PREFIX + "*"))}


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for path in glob.glob(f"/proc/{parent}/task/*/children"):
            try:
                kids = [int(k) for k in Path(path).read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _mapped_by(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _big(seed: int, rows: int = 1024) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 1024), dtype=np.float32)  # rows * 4 KiB


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shm_servables")
    (root / "big").mkdir()
    (root / "big" / "servable_config.py").write_text(CONFIG)
    return root


@pytest.fixture(scope="module")
def big_server(module_servers, big_dir):
    proc, rest, address = module_servers.local(big_dir, "big")
    yield proc, address
    rest.close()


def test_large_tensors_round_trip_through_shared_memory(big_server) -> None:
    proc, address = big_server
    x = _big(1)  # 4 MiB
    with Client(address, "big", "echo", timeout_s=30) as echo, Client(address, "big", "scale", timeout_s=30) as scale, \
            Client(address, "big", "grow", timeout_s=30) as grow:
        got = echo.infer({"x": x})
        assert isinstance(got, list), got
        np.testing.assert_array_equal(got[0]["y"], x)
        assert echo._shm is not None and echo._shm._idle == []  # the answer is a view: its segment is held

        got = scale.infer([{"x": x}, {"x": x + 1}])  # a new output: written into the reply space
        assert isinstance(got, list), got
        np.testing.assert_array_equal(got[0]["y"], x * 2)
        np.testing.assert_array_equal(got[1]["y"], (x + 1) * 2)
        assert int(got[1]["n"]) == x.size  # a small output beside: inline

        got = grow.infer({"x": x})  # twice the inputs' size: no room in the reply space, so inline
        assert isinstance(got, list), got
        np.testing.assert_array_equal(got[0]["y"], np.concatenate([x, x]))

        # the Worker really read the Client's segment: it maps it
        mine = {segment.name for segment in scale._shm._idle}
        assert mine, "the scale call's segment should be back in the pool"
        workers = _descendants(proc.pid)
        assert any(_mapped_by(pid, n) for pid in workers for n in mine), (workers, mine)


def test_threads_get_their_own_answers(big_server) -> None:
    _, address = big_server
    failures: list[str] = []
    with Client(address, "big", "scale", timeout_s=60) as client:
        def work(k: int) -> None:
            for i in range(4):
                x = _big(100 * k + i, rows=256 + 64 * k)
                got = client.infer({"x": x}) if i % 2 else client.infer_async({"x": x}).result()
                if not isinstance(got, list) or not np.array_equal(got[0]["y"], x * 2):
                    failures.append(f"thread {k} call {i}: {got if not isinstance(got, list) else 'wrong'}")

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not failures, failures


def test_a_timed_out_call_never_gets_its_segment_reused(big_server) -> None:
    _, address = big_server
    x = _big(2)
    before = _segments()
    with Client(address, "big", "slow_echo", timeout_s=0.5) as client:
        got = client.infer({"x": x, "secs": np.float32(2.0)})
        assert isinstance(got, dict) and "error" in got, got
        assert _segments() - before == set(), "the unanswered call's segment must be unlinked"
        assert client._shm is not None and client._shm._idle == []
        client.timeout_s = 30
        got = client.infer({"x": x + 3, "secs": np.float32(0.0)})  # a fresh segment; the late Worker can't touch it
        assert isinstance(got, list), got
        np.testing.assert_array_equal(got[0]["y"], x + 3)


def test_close_removes_the_client_segments(big_server) -> None:
    _, address = big_server
    before = _segments()
    client = Client(address, "big", "scale", timeout_s=30)
    got = client.infer({"x": _big(3)})
    assert isinstance(got, list), got
    assert _segments() - before  # the segment, kept for the next call
    client.close()
    assert _segments() - before == set()


def test_malformed_references_get_errors_and_the_server_keeps_serving(big_server) -> None:
    proc, address = big_server
    pool = shm.SegmentPool()
    lease = pool.lease(MB, MB)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(f"tcp://{address}")
    good = {"t": "shm", "seg": lease.segment.name, "off": 0, "dtype": "float32", "shape": [MB // 4]}
    cases = [
        ({**good, "off": MB * 2}, "out of bounds"),
        ({**good, "seg": shm.PREFIX + "1-" + "f" * 32}, shm.REFUSED),
        ({**good, "seg": "/etc/passwd"}, "bad segment name"),
        ({**good, "shape": "x"}, "malformed tensor shape"),
    ]
    try:
        for i, (desc, text) in enumerate(cases):
            header = {"v": PROTOCOL_VERSION, "id": i, "servable": "big", "method": "echo", "version": 0,
                      "instances": [{"x": desc}], "shm_out": lease.space().header()}
            sock.send_multipart([b"P", msgpack.packb(header)])
            kind, raw = sock.recv_multipart()[:2]
            reply = msgpack.unpackb(raw)
            assert reply["id"] == i and text in reply["error_msg"][0]["msg"], reply
        # a reply space that is not a segment of this host: the request fails as a whole, with the fallback text
        header = {"v": PROTOCOL_VERSION, "id": 9, "servable": "big", "method": "echo", "version": 0,
                  "instances": [{"x": good}], "shm_out": {"seg": shm.PREFIX + "1-" + "e" * 32, "off": 0, "size": MB}}
        sock.send_multipart([b"P", msgpack.packb(header)])
        reply = msgpack.unpackb(sock.recv_multipart()[1])
        assert shm.REFUSED in reply["error_msg"][0]["msg"], reply
    finally:
        sock.close(0)
        ctx.term()
        lease.finish(answered=True)
        pool.close()
    assert proc.alive()
    with Client(address, "big", "echo", timeout_s=30) as client:
        got = client.infer({"x": _big(4)})
    assert isinstance(got, list), got
    np.testing.assert_array_equal(got[0]["y"], _big(4))


def test_a_server_without_shared_memory_gets_inline_tensors(module_servers, big_dir) -> None:
    proc, rest, address = module_servers.local(big_dir, "big", SERVABLE_SHARED_MEMORY="0")
    try:
        x = _big(5)
        with Client(address, "big", "scale", timeout_s=30) as client:
            assert client._shm is not None  # a loopback address: the Client tries
            got = client.infer({"x": x})
            assert isinstance(got, list), got
            np.testing.assert_array_equal(got[0]["y"], x * 2)
            assert client._shm is None  # refused once: inline from now on
            got = client.infer_async({"x": x + 1}).result()
            assert isinstance(got, list), got
            np.testing.assert_array_equal(got[0]["y"], (x + 1) * 2)
        with Client(address, "big", "scale", timeout_s=30) as client:  # the fallback on the I/O thread's path
            got = client.infer_async({"x": x}).result()
            assert isinstance(got, list), got
            np.testing.assert_array_equal(got[0]["y"], x * 2)
            assert client._shm is None
        with Client(address, "big", "scale", timeout_s=30, shared_memory=False) as client:
            assert client._shm is None
    finally:
        rest.close()
        proc.stop()
