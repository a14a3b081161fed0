"""Tiny Qwen2.5-VL on CPU: time to first token and decode tokens/s at TP = 1 and 2, served vs in-process.

What is measured, in one run (everything sequential, nothing else of ours running meanwhile):

* served: examples/qwen/serving_server.py (--tp T, free ports; Main + Distributed Worker) and
  examples/qwen/serving_agent.py (T Agent processes, gloo); one request at a time with a fixed prompt,
  the fixed demo picture (96x64 red square PNG) and greedy decoding, over ZMQ (`Client`) and REST (httpx,
  keep-alive), the two interleaved request by request. ``T(n)`` = median latency of a request with
  ``max_new_tokens = n`` (after warm-up).
* in-process: bench/_qwen_inproc.py, T processes (gloo, no serving framework) running the same work for
  one request: the servable's own preprocess, ``Qwen25VLShard.generate``, the servable's postprocess.

TTFT = T(1). Decode tok/s = (N - 1) / (T(N) - T(1)). Overhead per request = served T(n) - in-process T(n)
(medians, same TP, same n). The run checks that the tiny model did not stop early on EOS (in-process
token count == N, stop reason "length") and that every served text equals the in-process text at that TP.
``QWEN_MAX_BATCH_DELAY_MS`` is 0 here (``--batch-delay-ms``): a lone request is not held back waiting
for a batch, so the overhead is the framework's own, not a configured wait.

    .venv/bin/python bench/bench_qwen.py [--tp 1 2] [--tokens 32] [--repeats 11]

Writes bench/results/bench_qwen.json.
"""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`, `servable_framework`

import httpx
import numpy as np

from bench._common import REPO, check_alive, median, stop_all, table, write_results
from bench._qwen import run_qwen_inproc, start_qwen
from bench._qwen_inproc import demo_image
from servable_framework.client import Client

PROMPT = "What is in this picture?"


def served(tp: int, tokens: list[int], repeats: int, warmup: int, delay_ms: str, tmp: Path) -> dict:
    """Start server + agents at ``tp``, time requests over ZMQ and REST; {proto: {n: {"s": [...], "text"}}}."""
    procs, rest_url, zmq_addr = start_qwen(tp, tmp, QWEN_MAX_BATCH_DELAY_MS=delay_ms)
    try:
        image = demo_image()
        zmq_client = Client(zmq_addr, "qwen", "predict", timeout_s=300)
        http = httpx.Client(base_url=rest_url, timeout=300)
        b64 = base64.b64encode(image).decode()

        def via_zmq(n: int) -> str:
            out = zmq_client.infer({"prompt": PROMPT, "image": image, "max_new_tokens": np.int32(n)})
            if not isinstance(out, list) or "text" not in out[0]:
                raise RuntimeError(f"ZMQ request failed: {out}")
            return out[0]["text"]

        def via_rest(n: int) -> str:
            r = http.post("/model/qwen:predict", json={"instances": [{"prompt": PROMPT, "image": {"b64": b64},
                                                                      "max_new_tokens": n}]})
            if r.status_code != 200 or "text" not in r.json()["instances"][0]:
                raise RuntimeError(f"REST request failed: {r.status_code} {r.text[:300]}")
            return r.json()["instances"][0]["text"]

        calls = {"ZMQ": via_zmq, "REST": via_rest}
        out: dict = {proto: {n: {"s": [], "text": ""} for n in tokens} for proto in calls}
        for rep in range(warmup + repeats):  # interleaved: a slow spell of the machine hits both protocols
            for n in tokens:
                for proto, call in calls.items():
                    t0 = time.perf_counter()
                    text = call(n)
                    if rep >= warmup:
                        out[proto][n]["s"].append(time.perf_counter() - t0)
                        out[proto][n]["text"] = text
        zmq_client.close()
        http.close()
        check_alive(procs)
        return out
    finally:
        stop_all(procs)


def in_process(tp: int, tokens: list[int], repeats: int, warmup: int, tmp: Path) -> dict:
    """bench/_qwen_inproc.py on ``tp`` ranks; {n: {"s": [...], "model_s": [...], "text", "n_tokens", ...}}."""
    from servables.qwen.tiny_model import build_tiny_qwen

    args = ["--ckpt", str(build_tiny_qwen(REPO / "tiny_models")), "--prompt", PROMPT, "--repeats", str(repeats),
            "--warmup", str(warmup), "--tokens", *map(str, tokens)]
    res = run_qwen_inproc(tp, args, tmp)["results"]
    return {int(n): {"s": r["e2e_s"], **r} for n, r in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=32, help="N: max_new_tokens of the long request")
    ap.add_argument("--repeats", type=int, default=11, help="timed repeats per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests before each measurement")
    ap.add_argument("--batch-delay-ms", default="0", help="QWEN_MAX_BATCH_DELAY_MS of the server")
    a = ap.parse_args()
    n_long, tokens = a.tokens, [1, a.tokens]

    tmp = Path(tempfile.mkdtemp(prefix="bench_qwen-"))
    raw: dict = {}
    try:
        for tp in a.tp:
            print(f"TP={tp}: in-process ...", flush=True)
            raw[(tp, "in-process")] = in_process(tp, tokens, a.repeats, a.warmup, tmp)
            print(f"TP={tp}: served ...", flush=True)
            srv = served(tp, tokens, a.repeats, a.warmup, a.batch_delay_ms, tmp)
            raw[(tp, "served ZMQ")], raw[(tp, "served REST")] = srv["ZMQ"], srv["REST"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows, cells, warnings = [], [], []
    for tp in a.tp:
        base = raw[(tp, "in-process")]
        if base[n_long]["n_tokens"] != n_long or base[n_long]["reason"] != "length":
            warnings.append(f"TP={tp}: in-process run stopped early ({base[n_long]['n_tokens']} tokens, "
                            f"{base[n_long]['reason']}): decode tok/s is not over N-1 tokens")
        b1, bn = median(base[1]["s"]), median(base[n_long]["s"])
        for kind in ("in-process", "served ZMQ", "served REST"):
            r = raw[(tp, kind)]
            t1, tn = median(r[1]["s"]), median(r[n_long]["s"])
            tok_s = (n_long - 1) / (tn - t1)
            same = all(r[n]["text"] == base[n]["text"] for n in tokens)
            if not same:
                warnings.append(f"TP={tp} {kind}: text differs from the in-process text")
            cells.append({"tp": tp, "path": kind, "ttft_ms": t1 * 1e3, f"t{n_long}_ms": tn * 1e3,
                          "decode_tok_s": tok_s, "overhead_1_ms": (t1 - b1) * 1e3,
                          f"overhead_{n_long}_ms": (tn - bn) * 1e3, "ttft_vs_inprocess": t1 / b1,
                          "decode_vs_inprocess": tok_s / ((n_long - 1) / (bn - b1)), "text_matches": same,
                          "samples_s": {n: r[n]["s"] for n in tokens},
                          "model_only_ms": {n: median(r[n]["model_s"]) * 1e3 for n in tokens} if "model_s" in r[1]
                          else None})
            c = cells[-1]
            rows.append([tp, kind, c["ttft_ms"], c[f"t{n_long}_ms"], tok_s, c["overhead_1_ms"],
                         c[f"overhead_{n_long}_ms"], c["ttft_vs_inprocess"], c["decode_vs_inprocess"],
                         "yes" if same else "NO"])
    print()
    print(table(["TP", "path", "TTFT ms", f"T({n_long}) ms", "decode tok/s", "overhead@1 ms",
                 f"overhead@{n_long} ms", "TTFT ratio", "tok/s ratio", "same text"], rows))
    print(f"medians of {a.repeats} runs; ratios and overheads vs in-process at the same TP; "
          f"decode tok/s = ({n_long}-1)/(T({n_long})-T(1))")
    for cell in cells:
        if cell["model_only_ms"]:
            m = cell["model_only_ms"]
            print(f"TP={cell['tp']} in-process generate() alone: T(1) {m[1]:.1f} ms, T({n_long}) {m[n_long]:.1f} ms")
    for w in warnings:
        print("WARNING:", w)
    write_results("bench_qwen", {"settings": vars(a), "prompt": PROMPT, "cells": cells, "warnings": warnings,
                                 "texts": {f"tp{tp}": raw[(tp, "in-process")][n_long]["text"] for tp in a.tp}})


if __name__ == "__main__":
    main()
