"""Throughput and latency of `add_common` (tensor_add example): framework REST and ZMQ vs a bare Starlette app.

What is measured, in one run, on this machine:

* framework: ``python -m tests.support.serve local`` (Main process + Worker process, as the tests start it)
  serving a temporary servable folder with the tensor_add example's servable_config.py and freshly
  exported tensor_add.pt2; REST (``POST /model/add:add_common``) and ZMQ (`servable_framework.client.Client`);
* baseline: ``bench/_bare_add_app.py``, one process, Starlette + uvicorn, the same .pt2 loaded with
  ``torch.export.load``, the same URL path and JSON bodies.

Load: closed loop, ``c`` threads in this process (c = 1 and 8); REST workers each hold their own keep-alive
``httpx.Client``; ZMQ workers each hold their own `Client`. Every cell: warm-up (not recorded), then until
``--requests`` answers or ``--seconds`` pass. Every answer is checked (y == x1 + x2, exact in float32);
wrong answers and failures are counted as errors. Ratios are req/s of the row / req/s of the baseline at
the same concurrency (and latency ratios likewise). The servers and the load generator share the CPUs.

    .venv/bin/python bench/bench_add.py [--requests 2000] [--seconds 10] [--warmup 3]

Writes bench/results/bench_add.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`, `servable_framework`

import httpx
import numpy as np

from bench._common import REPO, Proc, check_alive, free_port, run_load, stop_all, table, wait_http_ready, write_results
from servable_framework.client import Client

URL_PATH = "/model/add:add_common"
EXAMPLE = REPO / "examples" / "tensor_add"


def make_servable_dir(root: Path) -> Path:
    """<root>/add/servable_config.py (the example's) + <root>/add/1/tensor_add.pt2 (exported now)."""
    (root / "add").mkdir(parents=True)
    shutil.copy(EXAMPLE / "add" / "servable_config.py", root / "add" / "servable_config.py")
    spec = importlib.util.spec_from_file_location("add_model", EXAMPLE / "export_model" / "add_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.export(str(root))
    return root


def inputs(seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct, float32-exact inputs per request, so a mixed-up answer is caught."""
    base = np.arange(4, dtype=np.float32).reshape(2, 2)
    return base + np.float32(seq % 100000), base * np.float32(0.5) - np.float32(seq % 977)


def rest_worker(base_url: str):
    def make(_: int):
        client = httpx.Client(base_url=base_url, timeout=30.0)  # one keep-alive connection per worker

        def call(seq: int) -> bool:
            x1, x2 = inputs(seq)
            r = client.post(URL_PATH, json={"instances": [{"x1": x1.tolist(), "x2": x2.tolist()}]})
            if r.status_code != 200:
                return False
            y = np.asarray(r.json()["instances"][0]["y"], dtype=np.float32)
            return y.shape == (2, 2) and np.array_equal(y, x1 + x2)

        return call

    return make


def zmq_worker(address: str):
    def make(_: int):
        client = Client(address, "add", "add_common", timeout_s=30.0)

        def call(seq: int) -> bool:
            x1, x2 = inputs(seq)
            out = client.infer([{"x1": x1, "x2": x2}])
            if not isinstance(out, list) or "y" not in out[0]:
                return False
            y = out[0]["y"]
            return y.dtype == np.float32 and np.array_equal(y, x1 + x2)

        return call

    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per cell (upper bound)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell (upper bound)")
    ap.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per cell, not recorded")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_add-"))
    procs: list[Proc] = []
    cells: dict[tuple[str, int], dict] = {}
    try:
        sdir = make_servable_dir(tmp / "servables")
        rest_port, zmq_port, bare_port = free_port(), free_port(), free_port()
        fw = Proc(["-m", "tests.support.serve", "local", "--dir", str(sdir), "--name", "add",
                   "--rest", f"127.0.0.1:{rest_port}", "--zmq", f"127.0.0.1:{zmq_port}", "--device-ids", "0"],
                  "framework", tmp)
        bare = Proc([str(REPO / "bench" / "_bare_add_app.py"), str(sdir / "add" / "1" / "tensor_add.pt2"),
                     str(bare_port)], "bare_starlette", tmp)
        procs += [fw, bare]
        wait_http_ready(f"http://127.0.0.1:{rest_port}/ready", [fw], 120)
        wait_http_ready(f"http://127.0.0.1:{bare_port}/ready", [bare], 60)

        targets = [("framework REST", rest_worker(f"http://127.0.0.1:{rest_port}")),
                   ("framework ZMQ", zmq_worker(f"127.0.0.1:{zmq_port}")),
                   ("bare starlette REST", rest_worker(f"http://127.0.0.1:{bare_port}"))]
        for name, make in targets:
            for c in a.concurrency:
                cells[(name, c)] = res = run_load(make, c, a.warmup, a.requests, a.seconds)
                print(f"  {name:20s} c={c}: {res['rps']:8.1f} req/s  p50 {res['p50_ms']:.2f} ms  "
                      f"p99 {res['p99_ms']:.2f} ms  ({res['requests']} req, {res['errors']} errors)", flush=True)
        check_alive(procs)
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)

    rows, out = [], []
    for (name, c), r in cells.items():
        base = cells[("bare starlette REST", c)]
        rows.append([name, c, r["rps"], r["p50_ms"], r["p99_ms"], r["rps"] / base["rps"],
                     r["p50_ms"] / base["p50_ms"], r["p99_ms"] / base["p99_ms"], r["requests"],
                     r["errors"] + r["warmup_errors"]])
        out.append({"server": name, "concurrency": c, **r, "rps_vs_baseline": r["rps"] / base["rps"],
                    "p50_vs_baseline": r["p50_ms"] / base["p50_ms"], "p99_vs_baseline": r["p99_ms"] / base["p99_ms"]})
    print()
    print(table(["server", "c", "req/s", "p50 ms", "p99 ms", "req/s ratio", "p50 ratio", "p99 ratio",
                 "requests", "errors"], rows))
    print("ratios: row / bare starlette at the same concurrency (req/s: higher is better; latency: lower)")
    write_results("bench_add", {"settings": vars(a), "baseline": "bare starlette REST", "cells": out})


if __name__ == "__main__":
    main()
