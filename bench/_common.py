"""Shared benchmark helpers: free ports, real child processes (own session, whole-group teardown),
readiness polls with deadlines, a threaded closed-loop load generator, percentiles, tables, JSON output.

Every child carries ``SERVABLE_BENCH_SESSION=<id>`` in its environment, so `leftovers()` can find
anything still running (also after re-parenting) and `stop_all()` can end it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from servable_framework import testing
from servable_framework.testing import free_port  # noqa: F401 - re-exported to the benchmarks

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
SESSION = uuid.uuid4().hex
LOAD_AT_START = os.getloadavg()
# SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so every benchmark's `finally: stop_all(...)` still runs
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _cpu_ticks() -> list[int] | None:
    """The machine's CPU time counters (`/proc/stat`'s ``cpu`` line; None where there is none)."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


CPU_AT_START = _cpu_ticks()


def steal_share() -> float | None:
    """The share of CPU time the hypervisor took from this VM since the run started (`/proc/stat` steal): a noisy
    host shows here, and small-request latency rises with it."""
    now = _cpu_ticks()
    if CPU_AT_START is None or now is None or len(now) < 8:
        return None
    delta = [b - a for a, b in zip(CPU_AT_START, now)]
    total = sum(delta[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return delta[7] / total if total > 0 else None


def child_env(**extra: str) -> dict[str, str]:
    return testing.child_env("SERVABLE_BENCH_SESSION", SESSION, REPO, PYTHONUNBUFFERED="1", **extra)


class Proc:
    """A child Python process in its own session; `stop()` ends it and everything it started."""

    def __init__(self, args: list[str], name: str, log_dir: Path, cwd: Path | str = REPO,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen([PYTHON, *args], cwd=cwd, env=env or child_env(), stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, grace_s: float = 15.0) -> None:
        pgid = self.popen.pid  # start_new_session: the child leads its own process group
        testing.stop_popen(self.popen, grace_s)
        try:  # anything of its group still running (workers, agents): gone too
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


def leftovers() -> list[int]:
    """Live (non-zombie) processes carrying this benchmark session's marker."""
    return testing.marked_pids("SERVABLE_BENCH_SESSION", SESSION)


def check_alive(procs: list[Proc]) -> None:
    """A measurement only counts if every server process survived it."""
    for p in procs:
        if not p.alive():
            raise RuntimeError(f"{p.name} died during the run:\n{p.log_tail()}")


def stop_all(procs: list[Proc]) -> None:
    for p in reversed(procs):
        p.stop()
    for pid in leftovers():  # re-parented stragglers of this session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


CODE_GLOBS = ("servable_framework/**/*.py", "agents/*.py", "servables/**/*.py", "examples/**/*.py")


def code_digests() -> dict[str, str]:
    """File -> digest of the code under test (framework, shards, servables, examples) as it is on disk now."""
    import hashlib

    return {str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
            for p in sorted({p for g in CODE_GLOBS for p in REPO.glob(g)})}


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


CODE_AT_START = code_digests()


def _role(cmdline: str) -> str:
    for key, role in (("servable_framework.worker", "Worker"), ("servable_framework.agent", "Agent"),
                      ("serving_agent.py", "agent launcher"), ("serving_server.py", "Main"),
                      ("tests.support.serve", "Main")):
        if key in cmdline:
            return role
    return "other"


def cpu_seconds_by_role(root_pids: list[int]) -> dict[str, float]:
    """CPU seconds (user + system, all threads) used so far by ``root_pids`` and their descendants, by role
    (Main / Worker / Agent / ...), plus "load generator" (this process)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float, str]] = {}  # pid -> (ppid, cpu s, role)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        procs[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, _role(cmd))
    keep, frontier = set(root_pids), list(root_pids)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, _) in procs.items():
            if ppid == parent and pid not in keep:
                keep.add(pid)
                frontier.append(pid)
    out: dict[str, float] = {}
    for pid in keep & procs.keys():
        out[procs[pid][2]] = out.get(procs[pid][2], 0.0) + procs[pid][1]
    t = os.times()
    out["load generator"] = t.user + t.system
    return out


def wait_quiet(procs: list[Proc], timeout_s: float = 60.0, busy: float = 0.05) -> float:
    """Until ``procs`` and their descendants use under ``busy`` of a core over one second (e.g. the Agent
    startup process's standby interpreters have imported torch), so that measurements see the steady state;
    returns seconds waited (gives up quietly after ``timeout_s``)."""
    roots = [p.popen.pid for p in procs]
    t0 = time.monotonic()

    def used() -> float:
        return sum(v for k, v in cpu_seconds_by_role(roots).items() if k != "load generator")

    last = used()
    while time.monotonic() - t0 < timeout_s:
        time.sleep(1.0)
        now = used()
        if now - last < busy:
            break
        last = now
    return time.monotonic() - t0


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> float:
    """Poll ``predicate`` until true; returns seconds waited; TimeoutError after ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def wait_http_ready(url: str, procs: list[Proc], timeout_s: float) -> float:
    """Poll GET ``url`` for 200; fail fast (with the log) if any of ``procs`` exits meanwhile."""
    import httpx

    def check() -> bool:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited early (code {p.popen.returncode}):\n{p.log_tail()}")
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    return wait_until(check, timeout_s, url, 0.2)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50)


def run_load(make_worker: Callable[[int], Callable[[int], bool]], concurrency: int, warmup_s: float,
             max_requests: int, max_s: float) -> dict:
    """Closed-loop load: ``concurrency`` threads, each with its own ``call = make_worker(i)``.

    ``call(seq)`` sends one request and returns True when the answer was valid. After ``warmup_s`` (not
    recorded) the measurement runs until ``max_requests`` complete or ``max_s`` pass. Returns req/s,
    p50/p99 latency (ms), request and error counts of the measured window.
    """
    calls = [make_worker(i) for i in range(concurrency)]
    lock = threading.Lock()
    lat: list[float] = []
    errors = [0, 0]  # measured, warm-up
    state = {"measure_from": 0.0, "stop": False, "last_end": 0.0}
    seq = iter(range(10**12))

    def loop(call: Callable[[int], bool]) -> None:
        while not state["stop"]:
            with lock:
                n = next(seq)
            t0 = time.perf_counter()
            try:
                ok = call(n)
            except Exception:  # counted as an error; the load goes on
                ok = False
            t1 = time.perf_counter()
            if t0 < state["measure_from"]:
                errors[1] += not ok
            else:
                with lock:
                    lat.append(t1 - t0)
                    errors[0] += not ok
                    state["last_end"] = max(state["last_end"], t1)
                    if len(lat) >= max_requests:
                        state["stop"] = True

    state["measure_from"] = time.perf_counter() + warmup_s
    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in calls]
    for t in threads:
        t.start()
    start = state["measure_from"]
    time.sleep(max(0.0, start - time.perf_counter()))
    while not state["stop"] and time.perf_counter() - start < max_s:
        time.sleep(0.02)
    state["stop"] = True
    for t in threads:
        t.join(timeout=60)
    with lock:  # the window: from the end of the warm-up to the end of the last measured request
        done = list(lat)
        elapsed = max(state["last_end"] - start, 1e-9)
    return {"requests": len(done), "errors": errors[0], "warmup_errors": errors[1], "seconds": round(elapsed, 3),
            "rps": len(done) / elapsed, "p50_ms": percentile(done, 50) * 1e3, "p99_ms": percentile(done, 99) * 1e3}


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width text table (floats to 2 decimals)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    for r in cells:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(PYTHON, REPO), *sys.argv])


def write_results(name: str, data: dict) -> Path:
    """Write ``bench/results/<name>.json`` (with the command and machine facts) and print where."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    import platform

    steal = steal_share()
    now = code_digests()
    changed = sorted(f for f in set(now) | set(CODE_AT_START) if now.get(f) != CODE_AT_START.get(f))
    if changed:
        print(f"WARNING: code under test changed on disk during this run ({', '.join(changed)}): rerun")
    data = {"command": command_line(), "cwd": str(REPO), "git_head": git_head(), "code_changed_during_run": changed,
            "code_digests_at_start": CODE_AT_START, "cpus": os.cpu_count(),
            "loadavg_1_5_15min": {"start": LOAD_AT_START, "end": os.getloadavg()}, "cpu_steal_share": steal,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **data}
    path.write_text(json.dumps(data, indent=2, default=float))
    print(f"\nload average (1/5/15 min) at start {LOAD_AT_START}, at end {os.getloadavg()}; {os.cpu_count()} CPUs")
    if steal is not None:
        print(f"CPU time taken by the hypervisor (steal) during the run: {steal:.1%}")
    print(f"results: {os.path.relpath(path, REPO)}")
    print(f"command: (cd {REPO} && {command_line()})")
    return path
