"""Tiny Qwen2.5-VL on CPU: requests/s at concurrency 1 and 8 with cross-request batching on and off.

What is measured, in one run:

* served (examples/qwen/serving_server.py + serving_agent.py, ``--tp``, free ports), three times, one after the
  other: batching off (``QWEN_MAX_BATCH_SIZE=1``), static batching (``QWEN_MAX_BATCH_SIZE=8``,
  ``QWEN_MAX_BATCH_DELAY_MS=--delay-ms``, ``QWEN_CONTINUOUS_BATCHING=0``: a batch runs to its end while newer
  requests wait) and continuous batching (the same with ``QWEN_CONTINUOUS_BATCHING=1``, the servable's default:
  newer requests join the running decode loop as rows free up);
  every request is the same text-only prompt, greedy, ``max_new_tokens = --tokens`` (``--mixed``: request n asks
  for ``[tokens/4, tokens, 2*tokens][n % 3]``, where continuous batching matters most), sent over ZMQ
  (`servable_framework.client.Client`, one per thread); closed loop with c = 1 and 8 threads, warm-up excluded,
  then ``--seconds``. Identical requests in every cell; only the server's two batching knobs change.
* reference, in-process (bench/_qwen_inproc.py, no serving): one ``shard.generate`` call with 1 and with 8
  copies of the same request (the servable's preprocess/postprocess included) -> instances/s; the ceiling
  that batching in the model itself allows on this machine.

Also recorded per cell: the mean batch the Worker formed (GET /metrics) and the CPU cores each process role
used (Main, Worker, Agent, this load generator; /proc), to show what limits throughput.

Every reply is checked: failures count as errors; a text different from the in-process greedy text of its
length counts as a mismatch (batched float math may differ in the last bits). The pass line: with batching on,
in both modes, throughput at c=8 >= 3x that at c=1.

    .venv/bin/python bench/bench_batching.py [--tp 1] [--tokens 16] [--mixed] [--delay-ms 10] [--seconds 15]

Writes bench/results/bench_batching.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`, `servable_framework`

import httpx
import numpy as np

from bench._common import REPO, check_alive, cpu_seconds_by_role, median, run_load, stop_all, table, write_results
from bench._qwen import run_qwen_inproc, start_qwen
from servable_framework.client import Client

PROMPT = "Describe the quick brown fox and the lazy dog."


def reference(tp: int, lengths: list[int], batch: int, tmp: Path) -> list[dict]:
    """In-process generate() of ``batch`` copies per length; median seconds per call, instances/s, text."""
    from servables.qwen.tiny_model import build_tiny_qwen

    args = ["--ckpt", str(build_tiny_qwen(REPO / "tiny_models")), "--prompt", PROMPT, "--no-image",
            "--tokens", *map(str, lengths), "--repeats", "5", "--warmup", "2", "--batch", str(batch)]
    results = run_qwen_inproc(tp, args, tmp)["results"]
    return [{"batch": batch, "tokens": n, "e2e_s": median(r["e2e_s"]), "inst_per_s": batch / median(r["e2e_s"]),
             "n_tokens": r["n_tokens"], "reason": r["reason"], "text": r["text"]}
            for n, r in ((n, results[str(n)]) for n in lengths)]


def batch_counters(rest_url: str) -> tuple[float, float]:
    """(model batches, instances) run so far, from GET /metrics; Workers report them with each heartbeat,
    so poll until two reads a heartbeat apart agree."""
    def read() -> tuple[float, float]:
        totals = {"servable_model_batches_total": 0.0, "servable_model_instances_total": 0.0}
        for line in httpx.get(f"{rest_url}/metrics", timeout=10).text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
        return totals["servable_model_batches_total"], totals["servable_model_instances_total"]

    last = read()
    for _ in range(8):
        time.sleep(1.2)
        now = read()
        if now == last:
            break
        last = now
    return last


def served_cells(tp: int, env: dict[str, str], a: argparse.Namespace, expect: dict[int, str], tmp: Path
                 ) -> list[dict]:
    procs, rest_url, zmq_addr = start_qwen(tp, tmp, **env)
    cells = []
    try:
        for c in a.concurrency:
            b0, i0 = batch_counters(rest_url)
            cpu0, t0 = cpu_seconds_by_role([p.popen.pid for p in procs]), time.perf_counter()
            mismatches, lock = [0], threading.Lock()

            def make(_: int, mismatches=mismatches, lock=lock):
                client = Client(zmq_addr, "qwen", "predict", timeout_s=120)

                def call(n: int) -> bool:
                    length = a.lengths[n % len(a.lengths)]
                    out = client.infer({"prompt": PROMPT, "max_new_tokens": np.int32(length)})
                    if not isinstance(out, list) or not isinstance(out[0].get("text"), str):
                        return False
                    with lock:
                        mismatches[0] += out[0]["text"] != expect[length]
                    return True

                return call

            res = run_load(make, c, a.warmup, 10**9, a.seconds)
            cpu1, wall = cpu_seconds_by_role([p.popen.pid for p in procs]), time.perf_counter() - t0
            res["cores_used"] = {k: round((v - cpu0.get(k, 0.0)) / wall, 2) for k, v in cpu1.items()}  # warm-up incl.
            b1, i1 = batch_counters(rest_url)
            res["mean_batch"] = (i1 - i0) / max(b1 - b0, 1)  # warm-up included
            cells.append({"concurrency": c, **env, **res, "text_mismatches": mismatches[0]})
            print(f"  {env}  c={c}: {res['rps']:.2f} req/s  p50 {res['p50_ms']:.0f} ms  ({res['requests']} req, "
                  f"{res['errors']} errors, {mismatches[0]} mismatches, mean batch {res['mean_batch']:.2f}); "
                  f"CPU cores used: {res['cores_used']}", flush=True)
        check_alive(procs)
    finally:
        stop_all(procs)
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16, help="max_new_tokens of every request")
    ap.add_argument("--mixed", action="store_true", help="request n asks for [tokens/4, tokens, 2*tokens][n %% 3]")
    ap.add_argument("--delay-ms", default="10", help="QWEN_MAX_BATCH_DELAY_MS with batching on")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per cell, not recorded")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()
    a.lengths = [max(1, a.tokens // 4), a.tokens, 2 * a.tokens] if a.mixed else [a.tokens]
    mean_len = sum(a.lengths) / len(a.lengths)

    tmp = Path(tempfile.mkdtemp(prefix="bench_batching-"))
    try:
        alone = reference(a.tp, a.lengths, 1, tmp)
        expect = {r["tokens"]: r["text"] for r in alone}
        refs = [next(r for r in alone if r["tokens"] == a.tokens), reference(a.tp, [a.tokens], 8, tmp)[0]]
        on = {"QWEN_MAX_BATCH_SIZE": "8", "QWEN_MAX_BATCH_DELAY_MS": a.delay_ms}
        modes = {"off": {"QWEN_MAX_BATCH_SIZE": "1", "QWEN_MAX_BATCH_DELAY_MS": "0", "QWEN_CONTINUOUS_BATCHING": "0"},
                 "static": {**on, "QWEN_CONTINUOUS_BATCHING": "0"},
                 "continuous": {**on, "QWEN_CONTINUOUS_BATCHING": "1"}}
        cells = {m: served_cells(a.tp, env, a, expect, tmp) for m, env in modes.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def rps(mode: str, c: int) -> float:
        return next((x["rps"] for x in cells[mode] if x["concurrency"] == c), float("nan"))

    on1 = rps("continuous", 1)
    rows = []
    for mode, mode_cells in cells.items():
        for c in mode_cells:
            rows.append([f"batching {mode} (max {c['QWEN_MAX_BATCH_SIZE']}, {c['QWEN_MAX_BATCH_DELAY_MS']} ms)",
                         c["concurrency"], c["rps"], c["rps"] * mean_len, c["p50_ms"], c["p99_ms"], c["rps"] / on1,
                         c["mean_batch"], c["requests"], c["errors"] + c["warmup_errors"], c["text_mismatches"]])
    for r in refs:
        rows.append([f"in-process generate(), batch {r['batch']}", "-", r["inst_per_s"], r["inst_per_s"] * a.tokens,
                     r["e2e_s"] * 1e3, "-", r["inst_per_s"] / on1, float(r["batch"]), 5, 0,
                     int(r["text"] != expect[a.tokens])])
    print()
    print(f"requests ask for max_new_tokens {a.lengths} in turn" if a.mixed else f"max_new_tokens {a.tokens}")
    print(table(["server", "c", "req/s", "tok/s", "p50 ms", "p99 ms", "vs continuous c=1", "mean batch",
                 "requests", "errors", "mismatches"], rows))
    print(f"CPU cores used per process role ({os.cpu_count()} CPUs; warm-up included):")
    for mode, mode_cells in cells.items():
        for c in mode_cells:
            print(f"  batching {mode:3s} c={c['concurrency']}: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in sorted(c["cores_used"].items())))
    on8, static8, off1 = rps("continuous", 8), rps("static", 8), rps("off", 1)
    ratio, model_ratio = static8 / rps("static", 1), refs[1]["inst_per_s"] / refs[0]["inst_per_s"]
    passed = min(ratio, on8 / on1) >= 3
    print(f"\ncontinuous batching (default): c=8 / c=1 = {on8 / on1:.2f}x; static batching: c=8 / c=1 = "
          f"{ratio:.2f}x -> {'PASS' if passed else 'FAIL'} (target >= 3x, both); continuous c=8 / static c=8 = "
          f"{on8 / static8:.2f}x; continuous c=8 / batching off c=1 = {on8 / off1:.2f}x; "
          f"in-process model alone, batch 8 / batch 1 = {model_ratio:.2f}x")
    if refs[0]["n_tokens"] != a.tokens:
        print(f"WARNING: the reference stopped after {refs[0]['n_tokens']} tokens ({refs[0]['reason']})")
    write_results("bench_batching", {"settings": vars(a), "prompt": PROMPT, "reference": refs, "cells": cells,
                                     "static_c8_over_c1": ratio, "pass_3x": passed,
                                     "continuous_c8_over_c1": on8 / on1, "on_c8_over_off_c1": on8 / off1,
                                     "continuous_c8_over_static_c8": on8 / static8,
                                     "inprocess_batch8_over_batch1": model_ratio})


if __name__ == "__main__":
    main()
