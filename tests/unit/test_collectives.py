"""`servable_framework.engine.collectives.HostComm` against gloo's own collectives, in real processes joined in
a real torch.distributed (gloo) group: sums, gathers, broadcasts, chunking, 16-bit floats, and the failure cases
(a peer that aborts, dies or never comes)."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from servable_framework.engine.collectives import CollectiveError, HostComm, host_comm_supported
from servable_framework.testing import free_port
from tests.support.procs import REPO, child_env

pytestmark = pytest.mark.skipif(not host_comm_supported(torch.device("cpu")), reason="x86-64 with /dev/shm only")


def _spawn(target: str, world: int) -> None:
    """Run ``target(rank, world, port)`` of this module in ``world`` fresh processes; each must exit 0."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", f"from tests.unit.test_collectives import {target}; "
                               f"{target}({rank}, {world}, {port})"], cwd=REPO, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(world)]
    try:
        outs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{out[-4000:]}"


def _join(rank: int, world: int, port: int) -> dist.Store:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    return dist.distributed_c10d._get_default_store()


def _same_everywhere(t: torch.Tensor) -> None:
    """``t`` is bitwise the same on every rank of the world."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    for p in parts:
        assert torch.equal(p.view(torch.uint8) if p.dtype == torch.bool else p, t)


def _results(rank: int, world: int, port: int) -> None:
    store = _join(rank, world, port)
    pair = dist.new_group([0, 1])  # a sub-group, as a TP group of one stage
    whole = dist.new_group(list(range(world)))
    comms = {"whole": (HostComm.connect(store, "whole", whole, world, rank, 30.0), whole),
             "default": (HostComm.connect(store, "default", None, world, rank, 30.0), None)}  # the default group
    if rank < 2:
        comms["pair"] = (HostComm.connect(store, "pair", pair, 2, rank, 30.0), pair)
        # tiny slots: every tensor below goes through in many chunks
        comms["chunked"] = (HostComm.connect(store, "chunked", pair, 2, rank, 30.0, slot_bytes=1000), pair)
    gen = torch.Generator().manual_seed(1234 + rank)
    for name, (comm, group) in comms.items():
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            for shape in ((5, 7), (3000,), (0,), (2, 3, 1000)):
                x = (torch.randn(shape, generator=gen) * 100).to(dtype)
                want = x.clone()
                dist.all_reduce(want, group=group)
                got = comm.all_reduce_(x.clone())
                if dtype == torch.bfloat16 and comm.size > 2:  # summed in float32, rounded once
                    parts = [torch.empty_like(x) for _ in range(comm.size)]
                    dist.all_gather(parts, x, group=group)
                    exact = sum(p.float() for p in parts).to(dtype)
                    assert torch.equal(got, exact), name
                elif dtype == torch.float32 and comm.size > 2:  # another order than gloo's ring
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
                else:
                    assert torch.equal(got, want), (name, dtype, shape)
                gathered = comm.all_gather(x)
                expect = [torch.empty_like(x) for _ in range(comm.size)]
                dist.all_gather(expect, x, group=group)
                assert all(torch.equal(a, b) for a, b in zip(gathered, expect))
                for src in range(comm.size):
                    got = comm.broadcast_(x.clone(), src)
                    want = x.clone()
                    dist.broadcast(want, group_src=src, group=group)
                    assert torch.equal(got, want), (name, src)
                for dst in range(comm.size):
                    parts = comm.gather(x.T if x.dim() == 2 else x, dst)  # a non-contiguous input too
                    if comm.rank == dst:
                        assert parts is not None and all(
                            torch.equal(a, (b.T if b.dim() == 2 else b)) for a, b in zip(parts, expect))
                    else:
                        assert parts is None
        result = comm.all_reduce_(torch.randn(64, generator=gen))
        if name == "whole":
            _same_everywhere(result)  # every rank summed in the same order: bitwise equal
    dist.barrier()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"sf-tp-{os.getpid()}-")]  # unlinked at once


def test_host_comm_matches_gloo_and_chunks() -> None:
    _spawn("_results", 4)


def _failures(rank: int, world: int, port: int) -> None:
    store = _join(rank, world, port)
    group = dist.new_group([0, 1])
    comm = HostComm.connect(store, "f", group, 2, rank, timeout_s=1.0)
    comm.all_reduce_(torch.ones(4))
    # 1. the peer aborts (it leaves the group) instead of joining the next call
    if rank == 1:
        comm.abort()
    else:
        with pytest.raises(CollectiveError, match="aborted"):
            comm.all_reduce_(torch.ones(4))
    dist.barrier()
    # 2. the peer never comes: a timeout on both sides (each waits for the other in turn)
    comm = HostComm.connect(store, "t", group, 2, rank, timeout_s=0.5)
    if rank == 0:
        t0 = time.monotonic()
        with pytest.raises(CollectiveError, match="no progress"):
            comm.all_reduce_(torch.ones(4))
        assert time.monotonic() - t0 < 5
    dist.barrier()
    # 3. the peer dies: named at once (pid gone), long before the timeout
    comm = HostComm.connect(store, "d", group, 2, rank, timeout_s=60.0)
    dist.barrier()
    if rank == 1:
        os._exit(0)
    t0 = time.monotonic()
    with pytest.raises(CollectiveError, match=r"rank 1 \(pid \d+\) is gone"):
        comm.all_reduce_(torch.ones(4))
    assert time.monotonic() - t0 < 5


def test_host_comm_failures_raise_instead_of_hanging() -> None:
    _spawn("_failures", 2)


def test_names_left_by_a_dead_creator_are_removed() -> None:
    """A creator killed between creating its segment and the ranks' barrier leaves the name behind; the next
    creator's sweep removes it, and leaves a live process's alone."""
    from servable_framework.engine import collectives

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = f"/dev/shm/sf-tp-{int(gone.stdout)}-{os.urandom(8).hex()}"
    live = f"/dev/shm/sf-tp-{os.getpid()}-{os.urandom(8).hex()}"
    for path in (dead, live):
        with open(path, "wb"):
            pass
    try:
        collectives._remove_dead_segments()
        assert not os.path.exists(dead) and os.path.exists(live)
    finally:
        for path in (dead, live):
            if os.path.exists(path):
                os.unlink(path)
