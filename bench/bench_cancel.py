"""Tiny Qwen2.5-VL on CPU: what abandoned requests cost the others, with and without cancellation.

In one run, the same served Qwen (examples/qwen, ``--tp``, continuous batching, batch 8) is started twice,
``SERVABLE_CANCEL_ABANDONED=1`` (the default: a request past its deadline is stopped in the Worker and on the
Agents) and ``=0`` (it runs to its end for nobody, as in servers that only stop waiting). Both times, for
``--seconds``:

* ``--impatient`` threads send long requests (``--long-tokens``) with a deadline of ``--deadline-s`` (ZMQ
  ``timeout_s``): each times out, and the thread sends the next one at once;
* ``--patient`` threads send short requests (``--tokens``) without a deadline; their req/s and p50/p99 latency
  are the figures, every answer checked against the in-process greedy text.

    .venv/bin/python bench/bench_cancel.py [--tp 1] [--seconds 20]

Writes bench/results/bench_cancel.json.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`, `servable_framework`

import httpx
import numpy as np

from bench._common import check_alive, run_load, stop_all, table, write_results
from bench._qwen import start_qwen
from bench.bench_batching import PROMPT, reference
from servable_framework.client import Client

LONG_PROMPT = "Tell me a long story about the sea."


def stopped_rows(rest_url: str) -> int:
    text = httpx.get(f"{rest_url}/metrics", timeout=10).text
    return sum(int(float(v)) for v in re.findall(
        r'^servable_model_instances_cancelled_total\{[^}]*when="running"[^}]*\} (\S+)', text, re.M))


def cell(cancel: bool, a: argparse.Namespace, expect: str, tmp: Path) -> dict:
    env = {"SERVABLE_CANCEL_ABANDONED": "1" if cancel else "0", "QWEN_MAX_BATCH_SIZE": "8",
           "QWEN_MAX_BATCH_DELAY_MS": "10", "QWEN_CONTINUOUS_BATCHING": "1"}
    procs, rest_url, zmq_addr = start_qwen(a.tp, tmp, **env)
    stop = threading.Event()
    abandoned = [0]

    def impatient() -> None:
        with Client(zmq_addr, "qwen", "predict", timeout_s=a.deadline_s) as client:
            while not stop.is_set():
                out = client.infer({"prompt": LONG_PROMPT, "max_new_tokens": np.int32(a.long_tokens)})
                # MindSpore's client shape: a whole-request error is {"error": ...}, here "Request timed out"
                abandoned[0] += isinstance(out, dict) and "timed out" in str(out.get("error", ""))

    try:
        threads = [threading.Thread(target=impatient, daemon=True) for _ in range(a.impatient)]
        for t in threads:
            t.start()
        mismatches = [0]

        def make(_: int):
            client = Client(zmq_addr, "qwen", "predict", timeout_s=120)

            def call(n: int) -> bool:
                out = client.infer({"prompt": PROMPT, "max_new_tokens": np.int32(a.tokens)})
                mismatches[0] += out[0]["text"] != expect
                return True

            return call

        res = run_load(make, a.patient, a.warmup, 10**9, a.seconds)
        stop.set()
        for t in threads:
            t.join(a.deadline_s + 30)
        check_alive(procs)
        res.update(cancel=cancel, abandoned=abandoned[0], stopped_rows=stopped_rows(rest_url),
                   text_mismatches=mismatches[0])
        print(f"  cancel={cancel}: patient {res['rps']:.2f} req/s p50 {res['p50_ms']:.0f} ms p99 "
              f"{res['p99_ms']:.0f} ms; {abandoned[0]} abandoned, {res['stopped_rows']} rows stopped", flush=True)
        return res
    finally:
        stop.set()
        stop_all(procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16, help="max_new_tokens of the patient requests")
    ap.add_argument("--long-tokens", type=int, default=256, help="max_new_tokens of the abandoned requests")
    ap.add_argument("--deadline-s", type=float, default=0.3, help="deadline of the abandoned requests")
    ap.add_argument("--impatient", type=int, default=2, help="threads sending requests that time out")
    ap.add_argument("--patient", type=int, default=4, help="threads sending short requests, measured")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_cancel-"))
    try:
        expect = reference(a.tp, [a.tokens], 1, tmp)[0]["text"]
        cells = [cell(True, a, expect, tmp), cell(False, a, expect, tmp)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    on, off = cells
    print(table(["server", "patient req/s", "p50 ms", "p99 ms", "vs no cancel", "abandoned", "rows stopped",
                 "errors", "mismatches"],
                [[f"cancel abandoned = {c['cancel']}", c["rps"], c["p50_ms"], c["p99_ms"], c["rps"] / off["rps"],
                  c["abandoned"], c["stopped_rows"], c["errors"] + c["warmup_errors"], c["text_mismatches"]]
                 for c in cells]))
    print(f"\npatient throughput with cancellation / without: {on['rps'] / off['rps']:.2f}x; "
          f"p99 {on['p99_ms']:.0f} ms vs {off['p99_ms']:.0f} ms")
    write_results("bench_cancel", {"settings": vars(a), "cells": cells,
                                   "patient_rps_cancel_over_no_cancel": on["rps"] / off["rps"]})


if __name__ == "__main__":
    main()
