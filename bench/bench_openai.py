"""Tiny Qwen2.5-VL on CPU: what the OpenAI-compatible API costs over MindSpore's route, for the same chat request.

One served Qwen (examples/qwen, ``--tp``, ``QWEN_MAX_BATCH_DELAY_MS=0``: a lone request is not held back), one
request at a time, the same chat (one user message, text only, greedy, ``--tokens`` new tokens), over:

* ``predict``: ``POST /model/qwen:predict`` with ``{"instances": [{"messages": ..., "max_new_tokens": N}]}``
* ``predict SSE``: the same with ``Accept: text/event-stream``
* ``openai``: ``POST /v1/chat/completions`` (``max_tokens: N``)
* ``openai stream``: the same with ``"stream": true``

all with httpx (keep-alive), interleaved request by request (a slow spell of the machine hits every path), and
for information the same two OpenAI requests made with the ``openai`` package (its own parsing included).
TTFT = arrival of the first event with text (streaming paths only); total = until the whole answer is read.
Medians of ``--repeats`` after ``--warmup``. Every path must answer the same text with all N tokens. Pass line:
the OpenAI path adds <= 10 % to total latency (openai / predict and openai stream / predict SSE).

    .venv/bin/python bench/bench_openai.py [--tp 2] [--tokens 64] [--repeats 15]

Writes bench/results/bench_openai.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`, `servable_framework`

import httpx
import openai

from bench._common import check_alive, median, stop_all, table, write_results
from bench._qwen import start_qwen

PROMPT = "Tell me a long story about tensor parallel inference."
MESSAGES = [{"role": "user", "content": PROMPT}]
SSE = {"Accept": "text/event-stream"}

Timed = tuple[float | None, float, str]  # (TTFT s or None, total s, text)


def paths(http: httpx.Client, client: openai.OpenAI, n: int) -> dict[str, Callable[[], Timed]]:
    predict_body = {"instances": [{"messages": json.dumps(MESSAGES), "max_new_tokens": n}]}
    chat_body = {"model": "qwen", "messages": MESSAGES, "max_tokens": n}

    def predict() -> Timed:
        t0 = time.perf_counter()
        r = http.post("/model/qwen:predict", json=predict_body)
        total = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"predict: {r.status_code} {r.text[:300]}")
        return None, total, r.json()["instances"][0]["text"]

    def predict_sse() -> Timed:
        t0 = time.perf_counter()
        first, parts = None, []
        with http.stream("POST", "/model/qwen:predict", json=predict_body, headers=SSE) as r:
            if r.status_code != 200:
                raise RuntimeError(f"predict SSE: {r.status_code} {r.read()[:300]!r}")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    text = json.loads(line[6:]).get("text", "")
                    if text and first is None:
                        first = time.perf_counter() - t0
                    parts.append(text)
        return first, time.perf_counter() - t0, "".join(parts)

    def chat() -> Timed:
        t0 = time.perf_counter()
        r = http.post("/v1/chat/completions", json=chat_body)
        total = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"openai: {r.status_code} {r.text[:300]}")
        return None, total, r.json()["choices"][0]["message"]["content"]

    def chat_stream() -> Timed:
        t0 = time.perf_counter()
        first, parts = None, []
        with http.stream("POST", "/v1/chat/completions", json={**chat_body, "stream": True}) as r:
            if r.status_code != 200:
                raise RuntimeError(f"openai stream: {r.status_code} {r.read()[:300]!r}")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    text = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                    if text and first is None:
                        first = time.perf_counter() - t0
                    parts.append(text or "")
        return first, time.perf_counter() - t0, "".join(parts)

    def sdk() -> Timed:
        t0 = time.perf_counter()
        r = client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=n)  # type: ignore[arg-type]
        return None, time.perf_counter() - t0, r.choices[0].message.content or ""

    def sdk_stream() -> Timed:
        t0 = time.perf_counter()
        first, parts = None, []
        for chunk in client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=n,  # type: ignore
                                                    stream=True):
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text and first is None:
                first = time.perf_counter() - t0
            parts.append(text or "")
        return first, time.perf_counter() - t0, "".join(parts)

    return {"predict": predict, "predict SSE": predict_sse, "openai": chat, "openai stream": chat_stream,
            "openai (package)": sdk, "openai stream (package)": sdk_stream}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens of the chat request")
    ap.add_argument("--repeats", type=int, default=15, help="timed requests per path (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed requests per path first")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_openai-"))
    samples: dict[str, list[tuple[float | None, float]]] = {}
    texts: dict[str, set[str]] = {}
    try:
        procs, rest_url, _ = start_qwen(a.tp, tmp, QWEN_MAX_BATCH_DELAY_MS="0")
        try:
            http = httpx.Client(base_url=rest_url, timeout=300)
            client = openai.OpenAI(base_url=f"{rest_url}/v1", api_key="unused", max_retries=0, timeout=300)
            calls = paths(http, client, a.tokens)
            samples = {name: [] for name in calls}
            texts = {name: set() for name in calls}
            for rep in range(a.warmup + a.repeats):
                for name, call in calls.items():
                    ttft, total, text = call()
                    texts[name].add(text)
                    if rep >= a.warmup:
                        samples[name].append((ttft, total))
            usage = client.chat.completions.create(model="qwen", messages=MESSAGES,  # type: ignore[arg-type]
                                                   max_tokens=a.tokens).usage
            http.close()
            client.close()
            check_alive(procs)
        finally:
            stop_all(procs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    warnings = []
    all_texts = set().union(*texts.values())
    if len(all_texts) != 1:
        warnings.append(f"the paths answered different texts: {sorted(all_texts)[:3]}")
    if usage is None or usage.completion_tokens != a.tokens:
        warnings.append(f"the answer is not {a.tokens} tokens long: usage {usage}")
    med = {name: (median([t for t, _ in s if t is not None]) if s[0][0] is not None else None,
                  median([total for _, total in s])) for name, s in samples.items()}
    base = {"predict": "predict", "predict SSE": "predict SSE", "openai": "predict", "openai stream": "predict SSE",
            "openai (package)": "predict", "openai stream (package)": "predict SSE"}
    rows, cells = [], []
    for name, (ttft, total) in med.items():
        b_ttft, b_total = med[base[name]]
        ttft_ratio = ttft / b_ttft if ttft is not None and b_ttft is not None else None
        cells.append({"path": name, "baseline": base[name], "ttft_ms": ttft and ttft * 1e3, "total_ms": total * 1e3,
                      "ttft_ratio": ttft_ratio, "total_ratio": total / b_total,
                      "samples_s": samples[name]})
        rows.append([name, base[name], "-" if ttft is None else ttft * 1e3, total * 1e3,
                     "-" if ttft_ratio is None else ttft_ratio, total / b_total])
    verdict = {name: med[name][1] / med[base[name]][1] <= 1.10 for name in ("openai", "openai stream")}
    print()
    print(table(["path", "vs", "TTFT ms", f"total ms ({a.tokens} tok)", "TTFT ratio", "total ratio"], rows))
    print(f"medians of {a.repeats} requests per path, TP={a.tp}, greedy, {a.tokens} new tokens, httpx unless "
          f"'(package)'")
    for name, ok in verdict.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name} total latency {med[name][1] / med[base[name]][1]:.3f}x "
              f"of {base[name]} (line: <= 1.10x)")
    for w in warnings:
        print("WARNING:", w)
    write_results("bench_openai", {"settings": vars(a), "prompt": PROMPT, "cells": cells, "pass": verdict,
                                   "warnings": warnings, "text": sorted(all_texts)[0] if all_texts else None})


if __name__ == "__main__":
    main()
