"""Generation engine: the served Qwen2.5-VL at TP 1 vs Hugging Face ``generate()``, in one run.

The model (bench/_engine_model.py; random weights, seeded, bfloat16 on both sides):

* CPU (default): Qwen2.5-VL-3B-shaped (hidden 2048, 16 heads, 2 KV heads, intermediate 11008, vocabulary
  151936) cut to 4 decoder layers, built once into ``~/.cache/servable_framework/bench`` (``--cache``);
* ``--gpu``: Qwen2.5-VL-7B-shaped (hidden 3584, 28 heads, 4 KV heads, intermediate 18944, vocabulary 152064,
  all 28 layers), built on the GPU, saved there once for the Agent, measured by HF as built.

What is measured, one after the other (nothing else of ours runs meanwhile), greedy, ``N = --tokens`` (64) new
tokens, text-only prompts (8 different ones, chat template applied by both sides):

1. HF baseline (bench/_engine_hf.py, its own process): ``Qwen2_5_VLForConditionalGeneration.generate()`` with
   T torch threads, T = the Agent's thread count (``Settings.agent_thread_count``: ``SERVABLE_AGENT_THREADS``,
   else the usable cores shared among the host's Agents, here 1); then again with every core
   (``os.cpu_count()``) unless that is T already. Batch 1 (prompt 0) and a left-padded batch of 8 (prompts 0-7).
   Each call includes the chat template, tokenizer and decode, as a served request does.
2. served: examples/qwen/serving_server.py + serving_agent.py (``--checkpoint``, TP 1, the servable's defaults:
   continuous batching, max batch 8), driven over ZMQ by `servable_framework.client.Client`: concurrency 1
   (prompt 0) and waves of 8 concurrent clients, one Client each, prompt i for client i.

Figures (medians): TTFT = T(1), the latency of a ``max_new_tokens=1`` request (when the Client can stream,
``Client.infer_stream``, also the time to the first streamed piece of an N-token request); decode tok/s at
c=1 = (N-1) / (T(N) - T(1)); c=8: total tok/s = 8N / T8(N) (all generated tokens over the wall time of the
wave) and decode tok/s = 8(N-1) / (T8(N) - T8(1)). Ratios are the served side's advantage: baseline time /
served time, served rate / baseline rate (> 1: served is faster).

Pass: served decode tok/s at c=1 >= 1.0x and total tok/s at c=8 >= 1.5x the baseline with the same thread
count. The checkpoint's lm_head makes EOS and special tokens unreachable, so every request on both sides
generates exactly N tokens (checked on the HF side); served texts are compared with HF's (bf16 may flip a
near-tie: reported, not failed).

    .venv/bin/python bench/bench_engine.py [--tokens 64] [--repeats 5] [--waves 3] [--gpu]

Writes bench/results/bench_engine.json (``--gpu``: bench_engine_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`, `servable_framework`

import numpy as np

from bench._common import (
    REPO,
    Proc,
    check_alive,
    child_env,
    cpu_seconds_by_role,
    free_port,
    median,
    stop_all,
    table,
    wait_http_ready,
    write_results,
)
from bench._engine_model import DEFAULT_CACHE, param_count
from servable_framework.client import Client
from servable_framework.settings import Settings

PROMPTS = [
    "Describe the quick brown fox and the lazy dog.",
    "What is tensor parallel inference?",
    "Hello, world!",
    "Write a short story about a red square on a white background, in three sentences.",
    "Answer briefly: why split weight matrices across devices?",
    "List five colors.",
    "You are given an image of a picture. What could be in it, and how would you describe it to a friend "
    "who cannot see it?",
    "Count from one to ten.",
]
MODES = {"cpu": ("3b-4l", "cpu", "qwen25vl-3b-4l"), "gpu": ("7b", "cuda", "qwen25vl-7b")}


def hf_baseline(ckpt: Path, shape: str, device: str, threads: int, a: argparse.Namespace, tmp: Path) -> dict:
    """bench/_engine_hf.py with ``threads`` torch threads (builds the checkpoint first if missing)."""
    prompts, out = tmp / "prompts.json", tmp / f"hf-threads{threads}.json"
    prompts.write_text(json.dumps(PROMPTS))
    args = [str(REPO / "bench" / "_engine_hf.py"), "--ckpt", str(ckpt), "--build", shape, "--device", device,
            "--threads", str(threads), "--prompts", str(prompts), "--tokens", str(a.tokens), "--repeats",
            str(a.repeats), "--batch-repeats", str(a.waves), "--batch", str(a.concurrency), "--out", str(out)]
    proc = Proc(args, f"hf-threads{threads}", tmp, env=child_env(OMP_NUM_THREADS=str(threads),
                                                                 TRANSFORMERS_VERBOSITY="error"))
    try:
        code = proc.popen.wait(timeout=a.timeout_s)
        if code != 0:
            raise RuntimeError(f"{proc.name} failed (code {code}):\n{proc.log_tail()}")
    finally:
        stop_all([proc])
    return dict(json.loads(out.read_text()))


def start_served(ckpt: Path, threads: int, tmp: Path, timeout_s: float) -> tuple[list[Proc], str]:
    """examples/qwen's server + Agents at TP 1 on ``ckpt``, ready; (processes, ZMQ address)."""
    example = REPO / "examples" / "qwen"
    rest, zmq_addr, dist = free_port(), f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = child_env(SERVABLE_AGENT_THREADS=str(threads), SERVABLE_REQUEST_TIMEOUT_S=str(timeout_s),
                    TRANSFORMERS_VERBOSITY="error")
    procs = [Proc([str(example / "serving_server.py"), "--checkpoint", str(ckpt), "--tp", "1", "--rest",
                   f"127.0.0.1:{rest}", "--zmq", zmq_addr, "--distributed-address", dist], "server", tmp, tmp, env)]
    try:
        procs.append(Proc([str(example / "serving_agent.py"), "--checkpoint", str(ckpt), "--distributed-address",
                           dist], "agents", tmp, tmp, env))
        wait_http_ready(f"http://127.0.0.1:{rest}/ready", procs, timeout_s)
    except BaseException:
        stop_all(procs)
        raise
    return procs, zmq_addr


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def stream_probe(client: Any, n: int, repeats: int) -> dict:
    """Time to the first piece of ``Client.infer_stream`` for an ``n``-token request (when streaming exists)."""
    first: list[float] = []
    total: list[float] = []
    pieces = 0
    try:
        for _ in range(repeats):
            t0, seen, pieces = time.perf_counter(), None, 0
            for _piece in client.infer_stream({"prompt": PROMPTS[0], "max_new_tokens": np.int32(n)}):
                seen = time.perf_counter() - t0 if seen is None else seen
                pieces += 1
            total.append(time.perf_counter() - t0)
            first.append(seen if seen is not None else float("nan"))
    except Exception as exc:  # reported, not fatal: streaming is new
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"first_piece_s": first, "total_s": total, "pieces": pieces}


def served(ckpt: Path, threads: int, a: argparse.Namespace, tmp: Path) -> dict:
    """Start the servable, measure c=1 and c=8 waves over ZMQ, stop it; raw samples (seconds) and texts."""
    procs, zmq_addr = start_served(ckpt, threads, tmp, a.timeout_s)
    n, c = a.tokens, a.concurrency
    clients = [Client(zmq_addr, "qwen", "predict", timeout_s=a.timeout_s) for _ in range(c)]
    try:
        def ask(i: int, k: int) -> str:
            out = clients[i].infer({"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": np.int32(k)})
            if not isinstance(out, list) or not isinstance(out[0].get("text"), str):
                raise RuntimeError(f"request failed: {out}")
            return str(out[0]["text"])

        for k in (2, n):  # warm-up
            ask(0, k)
        single: dict[str, list[float]] = {"1": [], str(n): []}
        text = ""
        for _ in range(a.repeats):
            for k in (1, n):
                s, text = _timed(lambda k=k: ask(0, k))
                single[str(k)].append(s)
        stream = stream_probe(clients[0], n, a.repeats) if hasattr(Client, "infer_stream") else None
        with ThreadPoolExecutor(c) as pool:
            def wave(k: int) -> tuple[float, list[str]]:
                return _timed(lambda: list(pool.map(lambda i: ask(i, k), range(c))))

            for k in (2, n):  # warm-up at this batch shape
                wave(k)
            pids = [p.popen.pid for p in procs]
            cpu0, t0 = cpu_seconds_by_role(pids), time.perf_counter()
            waves: dict[str, list[float]] = {"1": [], str(n): []}
            texts: list[str] = []
            for _ in range(a.waves):
                for k in (1, n):
                    s, texts = wave(k)
                    waves[str(k)].append(s)
            cpu1, wall = cpu_seconds_by_role(pids), time.perf_counter() - t0
        check_alive(procs)
        agent_log = procs[1].log_tail(200_000)
        found = re.findall(r"uses (\d+) torch threads", agent_log)
        return {"single_s": single, "batch_s": waves, "single_text": text, "batch_texts": texts, "stream": stream,
                "agent_threads_logged": int(found[-1]) if found else None,
                "cores_used_c8": {k: round((v - cpu0.get(k, 0.0)) / wall, 2) for k, v in cpu1.items()}}
    finally:
        for client in clients:
            client.close()
        stop_all(procs)


def figures(run: dict, n: int, c: int) -> dict[str, float]:
    """TTFT, T(N), decode and total tok/s at c=1 and c=``c`` from the raw samples of one side."""
    t1, tn = median(run["single_s"]["1"]), median(run["single_s"][str(n)])
    b1, bn = median(run["batch_s"]["1"]), median(run["batch_s"][str(n)])
    return {"ttft_ms": t1 * 1e3, "t_n_ms": tn * 1e3, "decode_tok_s": (n - 1) / (tn - t1),
            "c8_ttft_ms": b1 * 1e3, "c8_t_n_ms": bn * 1e3, "c8_total_tok_s": c * n / bn,
            "c8_decode_tok_s": c * (n - 1) / (bn - b1)}


LATENCY = ("ttft_ms", "t_n_ms", "c8_ttft_ms", "c8_t_n_ms")


def advantage(key: str, srv: float, base: float) -> float:
    """Served advantage: baseline time / served time for latencies, served rate / baseline rate for rates."""
    return base / srv if key in LATENCY else srv / base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the 7B-shaped model on CUDA (see above)")
    ap.add_argument("--tokens", type=int, default=64, help="N: max_new_tokens of the long requests")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats at c=1 (median reported)")
    ap.add_argument("--waves", type=int, default=3, help="timed waves at c=8 (median reported)")
    ap.add_argument("--concurrency", type=int, default=8, help="clients per wave / HF batch size")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the checkpoint is built (kept)")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per process start / request deadline")
    a = ap.parse_args()
    if not 1 <= a.concurrency <= len(PROMPTS):
        ap.error(f"--concurrency must be in [1, {len(PROMPTS)}]")
    mode = "gpu" if a.gpu else "cpu"
    shape, device, dirname = MODES[mode]
    ckpt = a.cache / dirname
    n, c = a.tokens, a.concurrency
    threads = Settings.from_env().agent_thread_count(1)  # the Agent's default at TP 1 on this host
    all_cores = os.cpu_count() or 1

    tmp = Path(tempfile.mkdtemp(prefix="bench_engine-"))
    t_start = time.perf_counter()
    try:
        print(f"{mode}: HF generate() baseline, {threads} threads (builds {ckpt} if missing) ...", flush=True)
        hf = {threads: hf_baseline(ckpt, shape, device, threads, a, tmp)}
        if all_cores != threads and mode == "cpu":
            print(f"HF generate() baseline, all {all_cores} cores ...", flush=True)
            hf[all_cores] = hf_baseline(ckpt, shape, device, all_cores, a, tmp)
        print(f"served, TP 1, SERVABLE_AGENT_THREADS={threads} ...", flush=True)
        srv = served(ckpt, threads, a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = figures(hf[threads], n, c)
    full = figures(hf[all_cores], n, c) if all_cores in hf else base
    mine = figures(srv, n, c)
    labels = {"ttft_ms": "c=1 TTFT ms (max_new_tokens=1 latency)", "t_n_ms": f"c=1 T({n}) ms",
              "decode_tok_s": "c=1 decode tok/s", "c8_ttft_ms": f"c={c} TTFT ms (wave of 1-token requests)",
              "c8_t_n_ms": f"c={c} T({n}) ms (wave / batch)", "c8_total_tok_s": f"c={c} total tok/s",
              "c8_decode_tok_s": f"c={c} decode tok/s"}
    rows = [[label, mine[k], base[k], advantage(k, mine[k], base[k]), full[k], advantage(k, mine[k], full[k])]
            for k, label in labels.items()]
    stream = srv["stream"]
    if stream and "first_piece_s" in stream:
        first = median(stream["first_piece_s"])
        rows.append(["c=1 TTFT ms (first streamed piece)", first * 1e3, base["ttft_ms"], base["ttft_ms"] / 1e3 / first,
                     full["ttft_ms"], full["ttft_ms"] / 1e3 / first])
    dtype = hf[threads]["dtype"]
    print()
    print(f"{mode}: Qwen2.5-VL {shape} random weights ({param_count(shape) / 1e9:.2f} B text parameters), {dtype} "
          f"on both sides, greedy, N={n}, {os.cpu_count()} CPUs" +
          (f", {hf[threads]['gpu']}" if hf[threads].get("gpu") else ""))
    print(table(["metric", "served TP1", f"generate() {threads} thr", "ratio", f"generate() {all_cores} thr "
                 "(all cores)", "ratio"], rows))
    print(f"medians of {a.repeats} (c=1) / {a.waves} (c={c}) runs; ratio = served advantage (> 1: served faster); "
          f"Agent threads {threads} (logged by the Agent: {srv['agent_threads_logged'] or 'not found'})")
    if all_cores not in hf or all_cores == threads:
        why = "is every core here" if all_cores == threads else "; no separate all-core run with --gpu"
        print(f"all-cores columns: the same generate() run ({threads} threads {why})")
    if not (stream and "first_piece_s" in stream):
        print("TTFT: no token streaming through the Client yet" if stream is None else
              f"TTFT: streaming probe failed ({stream['error']})", "- TTFT is the latency of a max_new_tokens=1 "
              "request (prefill + one sampled token + the framework's round trip)")
    print(f"CPU cores used per process role, served c={c} waves: " +
          ", ".join(f"{k} {v:.2f}" for k, v in sorted(srv["cores_used_c8"].items())))

    warnings = []
    for t, run in hf.items():
        if any(k != n for k in run["new_tokens"]):
            warnings.append(f"HF ({t} threads) generated {sorted(set(run['new_tokens']))} tokens, not always {n}")
    same1 = srv["single_text"] == hf[threads]["single_text"]
    same8 = sum(x == y for x, y in zip(srv["batch_texts"], hf[threads]["batch_texts"]))
    print(f"texts equal to HF generate(): c=1 {'yes' if same1 else 'NO'}; c={c} {same8}/{c} (vs the padded batch)")
    if not all(srv["batch_texts"]) or not srv["single_text"]:
        warnings.append("a served answer was empty")
    for w in warnings:
        print("WARNING:", w)
    r1, r8 = mine["decode_tok_s"] / base["decode_tok_s"], mine["c8_total_tok_s"] / base["c8_total_tok_s"]
    passed = r1 >= 1.0 and r8 >= 1.5
    print(f"\n{'PASS' if passed else 'FAIL'}: served vs generate() with {threads} threads: c=1 decode tok/s "
          f"{r1:.2f}x (target >= 1.0x), c={c} total tok/s {r8:.2f}x (target >= 1.5x); "
          f"run took {time.perf_counter() - t_start:.0f} s")
    write_results("bench_engine_gpu" if a.gpu else "bench_engine", {
        "settings": {**vars(a), "cache": str(a.cache)}, "mode": mode, "shape": shape, "checkpoint": str(ckpt),
        "dtype": dtype, "agent_threads": threads, "all_cores": all_cores, "prompts": PROMPTS,
        "served": {**srv, "figures": mine},
        "hf": {str(t): {**run, "figures": figures(run, n, c)} for t, run in hf.items()},
        "ratios_same_threads": {k: advantage(k, mine[k], base[k]) for k in labels},
        "ratios_all_cores": {k: advantage(k, mine[k], full[k]) for k in labels},
        "text_equal_c1": same1, "text_equal_c8": same8, "warnings": warnings,
        "pass": passed, "pass_c1_decode_ratio": r1, "pass_c8_total_ratio": r8})


if __name__ == "__main__":
    main()
