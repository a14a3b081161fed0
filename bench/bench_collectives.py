"""Tensor-parallel collectives on CPU: the Agents' shared-memory `HostComm` against gloo, in one run.

Two (``--world``) rank processes on this host join a real gloo group, as Agents do; each side runs the same calls in
turn, alternating ``--rounds`` times (the host's speed drifts): ``all_reduce`` (sum, float32) of 8 KB (a decode
step's hidden state at batch 1), 64 KB (batch 8) and 1 MiB (a prefill), ``all_gather`` of 4 KB (the distributed
MatMul's 128x8 slice) and ``gather`` to rank 0 of 296 KB (one rank's block of a vocabulary-parallel head's float32
logits at batch 1: 151936 / 2 values). Figures are rank 0's wall time and process CPU time per call (medians over
the rounds); the ratio is gloo / shared memory (> 1: shared memory is faster). Each process uses one torch thread.

    .venv/bin/python bench/bench_collectives.py [--world 2] [--rounds 3] [--calls 400]

Writes bench/results/bench_collectives.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`, `servable_framework`

from bench._common import PYTHON, REPO, child_env, free_port, median, table, write_results

CASES = [("all_reduce", 2048), ("all_reduce", 16384), ("all_reduce", 262144), ("all_gather", 1024),
         ("gather", 75968)]  # (collective, float32 elements)


def _call(op: str, comm: object, x: object) -> None:
    if op == "all_reduce":
        comm.all_reduce_(x.clone())  # type: ignore[attr-defined]
    elif op == "all_gather":
        comm.all_gather(x)  # type: ignore[attr-defined]
    else:
        comm.gather(x, 0)  # type: ignore[attr-defined]


def rank_main(rank: int, world: int, port: int, rounds: int, calls: int) -> None:
    """One rank: every case, both implementations, ``rounds`` times; rank 0 prints one JSON line."""
    import torch
    import torch.distributed as dist

    from servable_framework.engine.collectives import DistComm, HostComm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.new_group(list(range(world)))
    comms = {"gloo": DistComm(group),
             "shared memory": HostComm.connect(dist.distributed_c10d._get_default_store(), "bench", group, world,
                                               rank, 120.0)}
    out: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for op, numel in CASES:
            x = torch.full((numel,), float(rank + 1))
            n = max(20, calls * 2048 // max(numel, 2048))
            for name, comm in comms.items():
                for _ in range(10):
                    _call(op, comm, x)
                dist.barrier(group)
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(n):
                    _call(op, comm, x)
                wall, cpu = (time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6
                cell = out.setdefault(f"{op} {numel * 4 // 1024} KB", {})
                cell.setdefault(f"{name} wall", []).append(wall)
                cell.setdefault(f"{name} cpu", []).append(cpu)
    check = comms["shared memory"].all_reduce_(torch.full((8,), float(rank + 1)))
    assert float(check[0]) == world * (world + 1) / 2
    dist.barrier(group)
    if rank == 0:
        print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=400, help="calls per measurement for the small tensors")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank is not None:
        rank_main(a.rank, a.world, a.port, a.rounds, a.calls)
        return
    port = free_port()
    procs = [subprocess.Popen([PYTHON, __file__, "--rank", str(r), "--port", str(port), "--world", str(a.world),
                               "--rounds", str(a.rounds), "--calls", str(a.calls)], cwd=REPO, env=child_env(),
                              stdout=subprocess.PIPE, text=True) for r in range(a.world)]
    try:
        outs = [p.communicate(timeout=1200)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    if any(p.returncode for p in procs):
        sys.exit(f"a rank failed: exit codes {[p.returncode for p in procs]}")
    raw = json.loads(outs[0].strip().splitlines()[-1])
    rows = []
    for case, cell in raw.items():
        g_wall, s_wall = median(cell["gloo wall"]), median(cell["shared memory wall"])
        g_cpu, s_cpu = median(cell["gloo cpu"]), median(cell["shared memory cpu"])
        rows.append([case, g_wall, s_wall, g_wall / s_wall, g_cpu, s_cpu, g_cpu / s_cpu])
    print(f"\n{a.world} ranks on this host, rank 0's figures per call (medians of {a.rounds} rounds):\n")
    print(table(["collective (float32)", "gloo wall us", "shm wall us", "ratio", "gloo cpu us", "shm cpu us",
                 "ratio"], rows))
    write_results("bench_collectives", {"world": a.world, "rounds": a.rounds, "raw": raw,
                                        "rows": [dict(zip(["case", "gloo_wall_us", "shm_wall_us", "wall_ratio",
                                                           "gloo_cpu_us", "shm_cpu_us", "cpu_ratio"], r))
                                                 for r in rows]})


if __name__ == "__main__":
    main()
