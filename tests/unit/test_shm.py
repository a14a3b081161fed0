"""`servable_framework.shm` on its own: descriptors, bounds, reply placement, segment reuse and lifetime.

The processes (Client -> Main -> Worker) are in tests/integration/test_shared_memory.py.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from servable_framework import shm
from servable_framework.errors import InvalidInput
from servable_framework.wire import DTYPES, decode_value, encode_value

MB = 1 << 20


def _exists(name: str) -> bool:
    return os.path.exists(os.path.join(shm.SHM_DIR, name))


@pytest.fixture
def pool():
    p = shm.SegmentPool()
    yield p
    p.close()


def test_worker_reads_what_the_client_put_and_aliases_pass_through(pool) -> None:
    x = np.random.default_rng(0).random((512, 1024), dtype=np.float32)  # 2 MiB
    lease = pool.lease(x.nbytes, x.nbytes)
    desc = encode_value(x, [], lease.put)
    assert desc["t"] == "shm" and desc["seg"] == lease.segment.name
    mapper = shm.Mapper()
    seen = decode_value(desc, [], mapper.array)  # the Worker's view
    np.testing.assert_array_equal(seen, x)
    assert not seen.flags.writeable
    writer = mapper.writer(lease.space())
    # an output that is the input itself: named where it lies, nothing written
    assert writer.place(seen, "float32") == desc
    # a new output: copied into the reply space, after the inputs
    y = seen * 2
    placed = writer.place(y, "float32")
    assert placed is not None and placed["off"] >= lease.reply_off
    out = decode_value(placed, [], lease.read)
    np.testing.assert_array_equal(out, x * 2)
    # no room left for a third one: it travels inline
    assert writer.place(y + 1, "float32") is None
    # small outputs always travel inline
    assert writer.place(np.ones(4, np.float32), "float32") is None


def test_references_are_checked(pool) -> None:
    lease = pool.lease(MB, MB)
    mapper = shm.Mapper()
    good = {"t": "shm", "seg": lease.segment.name, "off": 0, "dtype": "float32", "shape": [MB // 4]}
    decode_value(good, [], mapper.array)
    bad = [
        ({**good, "off": lease.segment.size}, "out of bounds"),
        ({**good, "shape": [MB]}, "out of bounds"),
        ({**good, "seg": "../../etc/passwd"}, "bad segment name"),
        ({**good, "seg": shm.PREFIX + "1-" + "0" * 32}, shm.REFUSED),  # well formed, but no such segment
        ({**good, "dtype": "object"}, "Unknown data type"),
        ({**good, "shape": [-1]}, "malformed tensor shape"),
        ({**good, "off": True}, "bad offset"),
    ]
    for desc, text in bad:
        with pytest.raises(InvalidInput, match=text.replace(".", r"\.")):
            decode_value(desc, [], mapper.array)
    # a decoder that was not told how to read shared memory refuses it, with the text a Client falls back on
    with pytest.raises(InvalidInput, match=shm.REFUSED):
        decode_value(good, [])
    for raw in ({"seg": "x", "off": 0, "size": 1}, {"seg": lease.segment.name, "off": -1, "size": 1}, [1]):
        with pytest.raises(InvalidInput, match="malformed shm_out"):
            shm.parse_space(raw)
    assert shm.parse_space(None) is None


def test_an_answered_segment_is_reused_only_when_its_outputs_are_gone(pool) -> None:
    first = pool.lease(MB, MB)
    out = first.read(shm.ShmTensor(first.segment.name, first.reply_off, "float32", (MB // 4,)))
    first.finish(answered=True)
    second = pool.lease(MB, MB)
    assert second.segment is not first.segment  # `out` still lives in the first one
    second.finish(answered=True)
    del out
    gc.collect()
    third = pool.lease(MB, MB)
    assert third.segment in (first.segment, second.segment)  # both back in the pool
    third.finish(answered=True)


def test_an_unanswered_segment_is_never_reused(pool) -> None:
    lease = pool.lease(MB, MB)
    name = lease.segment.name
    lease.finish(answered=False)  # e.g. the call timed out: a Worker may still write into it
    assert not _exists(name)
    again = pool.lease(MB, MB)
    assert again.segment.name != name
    again.finish(answered=True)


def test_close_removes_the_segments(pool) -> None:
    leases = [pool.lease(MB, MB) for _ in range(3)]
    names = [lease.segment.name for lease in leases]
    for lease in leases:
        lease.finish(answered=True)
    assert sum(_exists(n) for n in names) == shm.IDLE_SEGMENTS  # the others were dropped at once
    pool.close()
    assert not any(_exists(n) for n in names)


def test_mapper_keeps_a_bounded_number_of_segments(pool) -> None:
    mapper = shm.Mapper(capacity=2)
    leases = [pool.lease(MB, 0) for _ in range(3)]
    arrays = [mapper.array(shm.ShmTensor(lease.segment.name, 0, "uint8", (MB,))) for lease in leases]
    assert len(mapper._mapped) == 2
    for arr in arrays:  # an array taken before its segment was dropped from the map stays valid
        assert arr.sum() == 0
    for lease in leases:
        lease.finish(answered=True)


def test_dtypes_match_the_wire() -> None:
    for name in DTYPES:
        ref = shm.parse_tensor({"seg": shm.PREFIX + "1-" + "a" * 32, "off": 0, "dtype": name, "shape": [2, 3]}, DTYPES)
        assert ref.nbytes == 6 * DTYPES[name].itemsize


def test_mapper_drops_segments_their_clients_removed(pool) -> None:
    mapper = shm.Mapper()
    first = pool.lease(MB, 0)
    mapper.array(shm.ShmTensor(first.segment.name, 0, "uint8", (MB,)))
    first.finish(answered=False)  # unlinked by its client
    second = pool.lease(MB, 0)
    mapper.array(shm.ShmTensor(second.segment.name, 0, "uint8", (MB,)))
    assert list(mapper._mapped) == [second.segment.name]
    second.finish(answered=True)


def test_segments_of_dead_clients_are_removed_by_the_next_client() -> None:
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; from servable_framework import shm; "
                            "p = shm.SegmentPool(); l = p.lease(1 << 20, 0); print(l.segment.name); os._exit(0)"],
                           capture_output=True, text=True, check=True, cwd=os.getcwd())
    name = child.stdout.strip()
    assert shm.NAME.fullmatch(name) and _exists(name)  # left behind: its process exited without closing
    pool = shm.SegmentPool()  # a new Client's pool
    try:
        assert not _exists(name)
    finally:
        pool.close()
