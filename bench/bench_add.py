"""The MindSpore protocol hot path (tensor_add ``add_common``): the framework against a bare in-process app.

What is measured, in one run, on this machine:

* framework: ``python -m tests.support.serve local`` (Main process + Worker process, as the tests start it)
  serving a temporary servable folder with the tensor_add example's servable_config.py and a freshly exported
  tensor_add.pt2, plus a second servable ``echo`` (one Python stage returning its input) for the large tensor;
* baseline: ``bench/_bare_add_app.py``, one process, Starlette + uvicorn with the framework's own uvicorn
  settings (`servable_framework.main.http.UVICORN_OPTIONS`: event loop, HTTP implementation, log level,
  keep-alive; one process), the same .pt2 loaded with ``torch.export.load``, the same URL path and JSON body.

Rows of the table:

* REST via ``wrk`` (one thread, keep-alive, ``POST /model/add:add_common`` with MindSpore's JSON body of two 2x2
  float32 inputs from a Lua script): c=1 p50 latency (wrk ``--latency``), c=8 and c=32 req/s. For each
  concurrency the bare app and the framework run in turn, ``--rounds`` times each (a 1 s warm-up before every
  run), and the run with the median req/s of each side counts (all rounds are in the JSON): the host's speed
  drifts within minutes, and alternating rounds expose both sides to the same drift;
* REST via a Python closed loop (one thread, a keep-alive ``httpx.Client``, every answer checked) at c=1: p50;
* ZMQ: `servable_framework.client.Client` round trip at c=1 (p50, every answer checked) next to a
  ``torch.distributed.rpc`` ``rpc_sync`` of the same two tensors (``bench/_torch_rpc.py``: two processes,
  TensorPipe backend on localhost);
* large tensor: one 64 MiB float32 tensor through the Client -> Main -> Worker -> back (``echo``), next to the
  same through torch RPC and next to a plain memcpy (``np.copyto``) of 64 MiB. The Client passes it through
  shared memory (`servable_framework.shm`, its default for a local server): it copies the tensor into its
  segment once, the Worker reads it in place, and ``echo``'s output, a view of the input, comes back as a
  read-only view of the segment. Also, not in the goals: ``negate`` (a new 64 MiB output, written into the
  reply space by the Worker) next to torch RPC's ``-x``, and ``echo`` with ``shared_memory=False`` (inline
  frames through Main);
* distributed MatMul (``matmul``, ``y = -(x @ W)``, 128x96 @ 96x16 over 2 Agents, the tests' servable and
  shards; body: 128x96 ones, about 53 KB of JSON) via wrk at c=8 (and c=1), next to
  ``bench/_bare_matmul_app.py`` (the joined W in one Starlette process with the same uvicorn settings).

Set-up: ``wrk`` comes from Debian's packages (``apt-get install -y wrk``); the benchmark stops with that hint
when it is missing. The servers, ``wrk`` and this process share the CPUs: check the load (printed) and run it
twice before trusting a ratio.

    .venv/bin/python bench/bench_add.py [--seconds 5] [--rounds 3] [--concurrency 1 8 32] [--zmq-calls 2000]
                                        [--big-calls 5] [--skip wrk python zmq big matmul]

Writes bench/results/bench_add.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`, `servable_framework`

import httpx
import numpy as np

from bench._common import (
    PYTHON,
    REPO,
    Proc,
    check_alive,
    free_port,
    median,
    stop_all,
    table,
    wait_http_ready,
    write_results,
)
from servable_framework.client import Client
from servable_framework.main.http import UVICORN_OPTIONS
from servable_framework.settings import Settings

URL_PATH = "/model/add:add_common"
EXAMPLE = REPO / "examples" / "tensor_add"
BODY = '{"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]]}]}'
LUA = f"""wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""
ECHO_CONFIG = '''"""Benchmark servable: one Python stage that returns its input."""
from servable_framework.server import register


def identity(x):
    return x


def negative(x):
    return -x


@register.register_method(output_names=["y"])
def echo(x):
    return register.add_stage(identity, x, outputs_count=1)


@register.register_method(output_names=["y"])
def negate(x):
    return register.add_stage(negative, x, outputs_count=1)
'''
BIG_MIB = 64
KEEP_FREED_MIB = Settings().keep_freed_mib  # Main's and its Workers' default (`servable_framework.memtune`)


def make_servable_dir(root: Path) -> Path:
    """<root>/add/servable_config.py (the example's) + <root>/add/1/tensor_add.pt2 (exported now), and
    <root>/echo (a Python stage, no model)."""
    (root / "add").mkdir(parents=True)
    shutil.copy(EXAMPLE / "add" / "servable_config.py", root / "add" / "servable_config.py")
    spec = importlib.util.spec_from_file_location("add_model", EXAMPLE / "export_model" / "add_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.export(str(root))
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "servable_config.py").write_text(ECHO_CONFIG)
    return root


# ------------------------------------------------------------------------------------------------ wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(url: str, concurrency: int, seconds: float, script: Path) -> dict:
    """One wrk run: req/s, p50/p99 latency (ms), requests, socket errors and non-2xx answers."""
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout

    def latency(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")

    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(rps.group(1)) if rps else float("nan"), "p50_ms": latency("50"), "p99_ms": latency("99"),
            "requests": int(total.group(1)) if total else 0,
            "errors": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)}


def wrk_rounds(urls: dict[str, str], concurrency: int, seconds: float, script: Path, rounds: int,
               label: str = "") -> dict[str, dict]:
    """``rounds`` wrk runs of each URL at ``concurrency``, the URLs alternating (bare, framework, bare, ...), each
    after a 1 s warm-up; per URL the run with the median req/s (its p50/p99 with it), and every round's req/s.
    The host's speed drifts by 20-50 % within minutes here: alternating rounds let both sides see the same drift."""
    runs: dict[str, list[dict]] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            run_wrk(url, concurrency, 1, script)  # warm-up
            r = run_wrk(url, concurrency, seconds, script)
            runs[name].append(r)
            print(f"  wrk {label}{name:9s} c={concurrency:<3d} {r['rps']:9.1f} req/s  p50 {r['p50_ms']:.3f} ms  "
                  f"p99 {r['p99_ms']:.3f} ms  ({r['requests']} req, {r['errors']} errors)", flush=True)
    out = {}
    for name, rs in runs.items():
        ordered = sorted(rs, key=lambda r: r["rps"])
        out[name] = {**ordered[len(ordered) // 2], "rounds_rps": [r["rps"] for r in rs],
                     "rounds_p50_ms": [r["p50_ms"] for r in rs]}
    return out


def check_rest(base_url: str) -> None:
    """The body wrk sends gets the right answer (wrk itself only counts statuses)."""
    r = httpx.post(base_url + URL_PATH, content=BODY, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200 and r.json() == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}, r.text


# ---------------------------------------------------------------------------------------- Python loops


def inputs(seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct, float32-exact inputs per request, so a mixed-up answer is caught."""
    base = np.arange(4, dtype=np.float32).reshape(2, 2)
    return base + np.float32(seq % 100000), base * np.float32(0.5) - np.float32(seq % 977)


def python_rest_p50(base_url: str, calls: int) -> float:
    """c=1 closed loop with httpx (keep-alive); every answer checked; p50 ms."""
    lat = []
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for seq in range(200 + calls):
            x1, x2 = inputs(seq)
            t0 = time.perf_counter()
            r = client.post(URL_PATH, json={"instances": [{"x1": x1.tolist(), "x2": x2.tolist()}]})
            dt = time.perf_counter() - t0
            y = np.asarray(r.json()["instances"][0]["y"], dtype=np.float32)
            assert r.status_code == 200 and np.array_equal(y, x1 + x2)
            if seq >= 200:
                lat.append(dt)
    return median(lat) * 1e3


def zmq_p50(address: str, calls: int) -> float:
    """c=1 Client round trips of the 2x2 add; every answer checked; p50 ms."""
    lat = []
    with Client(address, "add", "add_common", timeout_s=30.0) as client:
        for seq in range(200 + calls):
            x1, x2 = inputs(seq)
            t0 = time.perf_counter()
            out = client.infer([{"x1": x1, "x2": x2}])
            dt = time.perf_counter() - t0
            assert out[0]["y"].dtype == np.float32 and np.array_equal(out[0]["y"], x1 + x2)
            if seq >= 200:
                lat.append(dt)
    return median(lat) * 1e3


def zmq_big_p50(address: str, calls: int, method: str = "echo", shared_memory: bool | None = None) -> float:
    """Round trips of one BIG_MIB MiB float32 tensor through ``echo`` (or ``negate``: a new output); answers
    checked; p50 ms. ``shared_memory``: the Client's setting (None: its default, on for this local server)."""
    x = np.arange(BIG_MIB * 2**20 // 4, dtype=np.float32)
    sign = -1 if method == "negate" else 1
    lat = []
    with Client(address, "echo", method, timeout_s=120.0, shared_memory=shared_memory) as client:
        for i in range(1 + calls):
            t0 = time.perf_counter()
            out = client.infer([{"x": x}])
            dt = time.perf_counter() - t0
            y = out[0]["y"]
            assert y.shape == x.shape and y[-1] == sign * x[-1] and y[12345] == sign * x[12345]
            del out, y
            if i >= 1:
                lat.append(dt)
    return median(lat) * 1e3


def memcpy_p50(calls: int = 20) -> float:
    src = np.arange(BIG_MIB * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    lat = []
    for _ in range(calls + 2):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        lat.append(time.perf_counter() - t0)
    return median(lat[2:]) * 1e3


def torch_rpc(small_calls: int, big_calls: int, keep_freed_mib: int = 0) -> dict:
    out = subprocess.run([PYTHON, str(REPO / "bench" / "_torch_rpc.py"), str(free_port()), str(small_calls),
                          str(big_calls), str(BIG_MIB), str(keep_freed_mib)], capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- matmul

MATMUL_RANKS = 2


def matmul_part(tmp: Path, lua_dir: Path, seconds: float, procs: list[Proc], rounds: int) -> dict[str, dict]:
    """Main + Distributed Worker + 2 Agents serving the tests' `matmul`, and the bare app, under wrk."""
    from tests.conftest import EXAMPLES, MATMUL_CONFIG, _load, write_rank_table

    root = tmp / "matmul_servables"
    (root / "matmul").mkdir(parents=True)
    (root / "matmul" / "servable_config.py").write_text(MATMUL_CONFIG.format(ranks=MATMUL_RANKS, stages=1,
                                                                             batch=False, pipeline=False))
    export = _load(EXAMPLES / "matmul_distributed" / "export_model" / "distributed_inference.py", "mm").export
    shards = export(str(root / "model"), MATMUL_RANKS, 1)
    table_path = write_rank_table(root / "rank_table.json", MATMUL_RANKS)
    rest_port, dist_port, bare_port = free_port(), free_port(), free_port()
    dist = f"127.0.0.1:{dist_port}"
    procs.append(Proc(["-m", "tests.support.serve", "distributed", "--dir", str(root), "--name", "matmul",
                       "--rank-table", str(table_path), "--dist-address", dist, "--rest", f"127.0.0.1:{rest_port}"],
                      "matmul_framework", tmp))
    procs.append(Proc(["-m", "tests.support.agents", dist, *shards], "matmul_agents", tmp))
    procs.append(Proc([str(REPO / "bench" / "_bare_matmul_app.py"), str(bare_port), *shards], "matmul_bare", tmp))
    urls = {"bare": f"http://127.0.0.1:{bare_port}", "framework": f"http://127.0.0.1:{rest_port}"}
    wait_http_ready(urls["framework"] + "/ready", procs, 180)
    wait_http_ready(urls["bare"] + "/ready", procs, 60)
    x = np.ones((128, 96), dtype=np.float32)
    body = json.dumps({"instances": [{"x": x.tolist()}]})
    for url in urls.values():  # both answer right before the load
        r = httpx.post(url + "/model/matmul:predict", content=body, timeout=30)
        assert r.status_code == 200 and np.array_equal(np.asarray(r.json()["instances"][0]["y"], np.float32),
                                                       -(x @ np.full((96, 16), 0.5, np.float32))), r.text[:300]
    script = lua_dir / "matmul.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = \'{body}\'\nwrk.headers["Content-Type"] = '
                      f'"application/json"\n')
    out: dict[str, dict] = {}
    for c in (1, 8):
        got = wrk_rounds({name: url + "/model/matmul:predict" for name, url in urls.items()}, c, seconds, script,
                         rounds, "matmul ")
        for name, r in got.items():
            out[f"wrk matmul {name} c={c}"] = r
    check_alive(procs)
    return out


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds of each wrk run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3, help="wrk runs of each side per row, alternating; the median "
                    "run counts")
    ap.add_argument("--zmq-calls", type=int, default=2000, help="measured 2x2 round trips (ZMQ, torch RPC, httpx)")
    ap.add_argument("--big-calls", type=int, default=5, help=f"measured {BIG_MIB} MiB round trips")
    ap.add_argument("--skip", nargs="*", default=[], choices=["wrk", "python", "zmq", "big", "matmul"],
                    help="leave parts out (a partial table, for quick checks)")
    a = ap.parse_args()
    if "wrk" not in a.skip and shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install -y wrk")

    tmp = Path(tempfile.mkdtemp(prefix="bench_add-"))
    script = tmp / "post.lua"
    script.write_text(LUA)
    procs: list[Proc] = []
    res: dict[str, dict] = {}
    try:
        sdir = make_servable_dir(tmp / "servables")
        rest_port, zmq_port, bare_port = free_port(), free_port(), free_port()
        fw = Proc(["-m", "tests.support.serve", "local", "--dir", str(sdir), "--name", "add",
                   "--also-local", str(sdir), "echo", "--max-msg-mb", "512",
                   "--rest", f"127.0.0.1:{rest_port}", "--zmq", f"127.0.0.1:{zmq_port}", "--device-ids", "0"],
                  "framework", tmp)
        bare = Proc([str(REPO / "bench" / "_bare_add_app.py"), str(sdir / "add" / "1" / "tensor_add.pt2"),
                     str(bare_port)], "bare_starlette", tmp)
        procs += [fw, bare]
        wait_http_ready(f"http://127.0.0.1:{rest_port}/ready", [fw], 120)
        wait_http_ready(f"http://127.0.0.1:{bare_port}/ready", [bare], 60)
        urls = {"bare": f"http://127.0.0.1:{bare_port}", "framework": f"http://127.0.0.1:{rest_port}"}
        for url in urls.values():
            check_rest(url)

        # the Client first, while this process and Main are as fresh as torch RPC's two processes (after the
        # wrk runs the same c=1 round trip measured 0.86 ms instead of 0.69, after the httpx loop 1.0 ms)
        if "zmq" not in a.skip:
            res["zmq"] = {"p50_ms": zmq_p50(f"127.0.0.1:{zmq_port}", a.zmq_calls)}
            print(f"  ZMQ Client c=1 p50 {res['zmq']['p50_ms']:.3f} ms", flush=True)
        if "big" not in a.skip:
            res["zmq big"] = {"p50_ms": zmq_big_p50(f"127.0.0.1:{zmq_port}", a.big_calls)}
            res["zmq big new"] = {"p50_ms": zmq_big_p50(f"127.0.0.1:{zmq_port}", a.big_calls, "negate")}
            res["zmq big inline"] = {"p50_ms": zmq_big_p50(f"127.0.0.1:{zmq_port}", a.big_calls, "echo", False)}
            print(f"  ZMQ Client {BIG_MIB} MiB p50 {res['zmq big']['p50_ms']:.2f} ms (echo), "
                  f"{res['zmq big new']['p50_ms']:.2f} ms (negate: a new output), "
                  f"{res['zmq big inline']['p50_ms']:.2f} ms (echo, shared_memory=False)", flush=True)
        if "wrk" not in a.skip:
            for c in a.concurrency:
                got = wrk_rounds({name: url + URL_PATH for name, url in urls.items()}, c, a.seconds, script,
                                 a.rounds)
                for name, r in got.items():
                    res[f"wrk {name} c={c}"] = r
        if "python" not in a.skip:
            for name, url in urls.items():
                res[f"httpx {name}"] = {"p50_ms": python_rest_p50(url, a.zmq_calls)}
                print(f"  httpx {name:9s} c=1   p50 {res[f'httpx {name}']['p50_ms']:.3f} ms", flush=True)
        check_alive(procs)
        stop_all(procs)
        procs = []
        if "matmul" not in a.skip:
            res.update(matmul_part(tmp, script.parent, a.seconds, procs, a.rounds))
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    if "zmq" not in a.skip or "big" not in a.skip:
        rpc = torch_rpc(a.zmq_calls, a.big_calls)
        res["torch rpc"] = {"p50_ms": rpc["small_p50_ms"]}
        res["torch rpc big"] = {"p50_ms": rpc["big_p50_ms"]}
        res["torch rpc big new"] = {"p50_ms": rpc["big_new_p50_ms"]}
        print(f"  torch RPC c=1 p50 {rpc['small_p50_ms']:.3f} ms, {BIG_MIB} MiB p50 {rpc['big_p50_ms']:.2f} ms "
              f"(echo), {rpc['big_new_p50_ms']:.2f} ms (negate)")
    if "big" not in a.skip:  # the baseline with the malloc setting Main and its Workers use (both RPC processes)
        tuned = torch_rpc(200, a.big_calls, KEEP_FREED_MIB)
        res["torch rpc big keep_freed"] = {"p50_ms": tuned["big_p50_ms"]}
        res["torch rpc big new keep_freed"] = {"p50_ms": tuned["big_new_p50_ms"]}
        print(f"  torch RPC with keep_freed_mib={KEEP_FREED_MIB}: {BIG_MIB} MiB p50 {tuned['big_p50_ms']:.2f} ms")
    if "big" not in a.skip:
        res["memcpy"] = {"p50_ms": memcpy_p50()}

    rows: list[list] = []
    checks: list[dict] = []

    def row(what: str, ours: float, base_name: str, base: float, unit: str, goal: str, ok: bool) -> None:
        rows.append([what, ours, base_name, base, unit, ours / base, goal, "PASS" if ok else "FAIL"])
        checks.append({"what": what, "framework": ours, "baseline": base_name, "baseline_value": base, "unit": unit,
                       "ratio": ours / base, "goal": goal, "pass": ok})

    if "wrk matmul framework c=8" in res:
        f, b = res["wrk matmul framework c=8"]["rps"], res["wrk matmul bare c=8"]["rps"]
        row("MatMul 2 Agents c=8 (wrk)", f, "bare app", b, "req/s", ">= 0.9", f / b >= 0.9)
        f, b = res["wrk matmul framework c=1"]["p50_ms"], res["wrk matmul bare c=1"]["p50_ms"]
        row("MatMul 2 Agents c=1 p50 (wrk)", f, "bare app", b, "ms", "-", True)
    for c in a.concurrency:
        fw_r, bare_r = res.get(f"wrk framework c={c}"), res.get(f"wrk bare c={c}")
        if fw_r is None or bare_r is None:
            continue
        if c == 1:
            ratio = fw_r["p50_ms"] / bare_r["p50_ms"]
            row("REST c=1 p50 (wrk)", fw_r["p50_ms"], "bare app", bare_r["p50_ms"], "ms", "<= 1.5", ratio <= 1.5)
        else:
            ratio = fw_r["rps"] / bare_r["rps"]
            row(f"REST c={c} (wrk)", fw_r["rps"], "bare app", bare_r["rps"], "req/s", ">= 0.95", ratio >= 0.95)
    if "httpx framework" in res:
        f, b = res["httpx framework"]["p50_ms"], res["httpx bare"]["p50_ms"]
        row("REST c=1 p50 (httpx)", f, "bare app", b, "ms", "-", True)
    if "zmq" in res:
        f, b = res["zmq"]["p50_ms"], res["torch rpc"]["p50_ms"]
        row("ZMQ Client c=1 p50", f, "torch RPC", b, "ms", "<= 1.0", f / b <= 1.0)
    if "zmq big" in res:
        f = res["zmq big"]["p50_ms"]
        row(f"{BIG_MIB} MiB round trip p50", f, "torch RPC", res["torch rpc big"]["p50_ms"], "ms", "<= 1.0",
            f <= res["torch rpc big"]["p50_ms"])
        tuned = res["torch rpc big keep_freed"]["p50_ms"]
        row(f"{BIG_MIB} MiB round trip p50", f, "RPC+keep_freed", tuned, "ms", "<= 1.0", f <= tuned)
        row(f"{BIG_MIB} MiB round trip p50", f, "memcpy", res["memcpy"]["p50_ms"], "ms", "<= 4.0",
            f <= 4 * res["memcpy"]["p50_ms"])
        # not in the goals: a new output (negate) on both sides, and the inline path (no shared memory)
        f = res["zmq big new"]["p50_ms"]
        row(f"{BIG_MIB} MiB negate p50", f, "torch RPC", res["torch rpc big new"]["p50_ms"], "ms", "-", True)
        row(f"{BIG_MIB} MiB negate p50", f, "RPC+keep_freed", res["torch rpc big new keep_freed"]["p50_ms"], "ms",
            "-", True)
        f = res["zmq big inline"]["p50_ms"]
        row(f"{BIG_MIB} MiB inline (no shm) p50", f, "torch RPC", res["torch rpc big"]["p50_ms"], "ms", "-", True)
    print()
    print(table(["measure", "framework", "baseline", "baseline value", "unit", "ratio", "goal", ""], rows))
    print("ratio: framework / baseline, measured in this run")
    write_results("bench_add", {"settings": vars(a), "uvicorn_options": UVICORN_OPTIONS, "raw": res,
                                "checks": checks})


if __name__ == "__main__":
    main()
