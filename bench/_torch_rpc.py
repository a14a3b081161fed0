"""Baseline for bench_add.py: a `torch.distributed.rpc` round trip (TensorPipe backend, localhost).

    python bench/_torch_rpc.py PORT SMALL_CALLS BIG_CALLS BIG_MIB [KEEP_FREED_MIB]

Two processes (this one, rank 0, and a copy of it started as rank 1, ``--rank1``). Rank 0 times
``rpc_sync("rank1", add, (x1, x2))`` with the tensor_add example's 2x2 float32 inputs (``SMALL_CALLS`` calls,
after a warm-up) and ``rpc_sync("rank1", echo, (x,))`` with one ``BIG_MIB`` MiB float32 tensor there and the same
back (``BIG_CALLS`` calls), then ``negate`` (a new tensor of the same size back), checks every answer, and
prints one line of JSON: p50 in ms of each. This is how the
seeds move tensors between processes; TensorPipe picks its own fastest local transport and channel.
``KEEP_FREED_MIB`` > 0 gives both processes the malloc tuning Main and its Workers use
(`servable_framework.memtune.keep_freed_memory`), so that the two sides can be compared with the same setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed.rpc as rpc


def add(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return x1 + x2


def echo(x: torch.Tensor) -> torch.Tensor:
    return x


def negate(x: torch.Tensor) -> torch.Tensor:
    return -x


def _options(port: str) -> rpc.TensorPipeRpcBackendOptions:
    return rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=4,
                                           rpc_timeout=120)


def _p50(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] * 1e3


def main() -> None:
    torch.set_num_threads(1)
    keep = int(sys.argv[-1]) if sys.argv[1] == "--rank1" and len(sys.argv) > 3 else (
        int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    if keep:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from servable_framework import memtune
        memtune.keep_freed_memory(keep)
    if sys.argv[1] == "--rank1":
        rpc.init_rpc("rank1", rank=1, world_size=2, rpc_backend_options=_options(sys.argv[2]))
        rpc.shutdown()  # waits for rank 0's calls
        return
    port, small_calls, big_calls, big_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    peer = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rank1", port, str(keep)])
    try:
        rpc.init_rpc("rank0", rank=0, world_size=2, rpc_backend_options=_options(port))
        base = torch.arange(4, dtype=torch.float32).reshape(2, 2)
        small: list[float] = []
        for i in range(200 + small_calls):
            x1, x2 = base + i, base * 0.5 - i
            t0 = time.perf_counter()
            y = rpc.rpc_sync("rank1", add, (x1, x2))
            dt = time.perf_counter() - t0
            assert torch.equal(y, x1 + x2)
            if i >= 200:
                small.append(dt)
        x = torch.arange(big_mib * 2**20 // 4, dtype=torch.float32)
        big: list[float] = []
        for i in range(1 + big_calls):
            t0 = time.perf_counter()
            y = rpc.rpc_sync("rank1", echo, (x,))
            dt = time.perf_counter() - t0
            assert y.shape == x.shape and float(y[-1]) == float(x[-1])
            if i >= 1:
                big.append(dt)
        new: list[float] = []
        for i in range(1 + big_calls):
            t0 = time.perf_counter()
            y = rpc.rpc_sync("rank1", negate, (x,))
            dt = time.perf_counter() - t0
            assert y.shape == x.shape and float(y[-1]) == -float(x[-1])
            if i >= 1:
                new.append(dt)
        rpc.shutdown()
        print(json.dumps({"small_p50_ms": _p50(small), "big_p50_ms": _p50(big), "big_new_p50_ms": _p50(new),
                          "small_calls": len(small), "big_calls": len(big)}), flush=True)
    finally:
        peer.wait(timeout=60)


if __name__ == "__main__":
    main()
