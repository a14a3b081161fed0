"""Qwen helpers for the benchmarks: start the example server + Agents; run the in-process baseline."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from bench._common import REPO, Proc, child_env, free_port, stop_all, wait_http_ready, wait_quiet


def start_qwen(tp: int, log_dir: Path, **env: str) -> tuple[list[Proc], str, str]:
    """examples/qwen/serving_server.py (--tp) + serving_agent.py on free ports, ready (GET /ready) and quiet
    (`wait_quiet`), or raising.

    Returns (processes, REST base URL, ZMQ address); the caller stops the processes (`stop_all`).
    """
    example = REPO / "examples" / "qwen"
    rest, zmq_addr, dist = free_port(), f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    procs = [Proc([str(example / "serving_server.py"), "--tp", str(tp), "--rest", f"127.0.0.1:{rest}", "--zmq",
                   zmq_addr, "--distributed-address", dist], f"server-tp{tp}", log_dir, log_dir, child_env(**env))]
    try:
        procs.append(Proc([str(example / "serving_agent.py"), "--distributed-address", dist], f"agents-tp{tp}",
                          log_dir, log_dir, child_env(**env)))
        wait_http_ready(f"http://127.0.0.1:{rest}/ready", procs, 300)
        # the startup process starts one standby interpreter per rank once the Agents are up: importing torch
        # takes seconds of CPU that would otherwise land in the first measurements
        wait_quiet(procs)
    except BaseException:
        stop_all(procs)
        raise
    return procs, f"http://127.0.0.1:{rest}", zmq_addr


def run_qwen_inproc(tp: int, args: list[str], log_dir: Path, timeout_s: float = 600) -> dict:
    """Run bench/_qwen_inproc.py on ``tp`` ranks (gloo, no serving) to completion; its JSON output."""
    out_file, port = Path(log_dir) / f"inproc-{uuid.uuid4().hex[:8]}.json", str(free_port())
    procs: list[Proc] = []
    try:
        for r in range(tp):
            env = child_env(RANK=str(r), WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            procs.append(Proc([str(REPO / "bench" / "_qwen_inproc.py"), *args, "--out", str(out_file)],
                              f"inproc-tp{tp}-rank{r}", log_dir, log_dir, env))
        for p in procs:
            code = p.popen.wait(timeout=timeout_s)
            if code != 0:
                raise RuntimeError(f"{p.name} failed (code {code}):\n{p.log_tail()}")
    finally:
        stop_all(procs)
    return json.loads(out_file.read_text())
