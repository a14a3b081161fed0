"""Fail-over between the Workers of one servable, through real processes (issue 12, contract §7).

Main with two device Workers of `failover_echo` (a Python-only servable: `tests/support/servables`); Workers are
killed with SIGKILL by pid. Checked: a kill under load loses no request and fails none sent after Main noticed
it (in-flight ones are re-run on the survivor, or fail with an error naming the dead Worker); a Worker crashing
four times in a row never starves its healthy sibling (the restart back-off runs beside the heartbeats, not
inside them); a servable whose last Worker has spent its restart budget makes ``/health`` answer 503.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.integration.test_faults import children_of, cmdline
from tests.support.procs import REPO, Proc, Rest, child_env, free_port, wait_until

SERVABLES = REPO / "tests" / "support" / "servables"

# Main as a user's serving_server.py would start it: one ServableStartConfig, then the REST front end
SERVE = """
import sys
from servable_framework import server
directory, name, devices, parallel, rest = sys.argv[1:6]
ids = [int(d) for d in devices.split(",") if d]
server.start_servables(server.ServableStartConfig(directory, name, device_ids=ids or None,
                                                  num_parallel_workers=int(parallel)))
server.start_restful_server(rest)
"""


def copy_servable(tmp: Path, name: str) -> Path:
    """A servable directory in ``tmp`` holding a copy of ``tests/support/servables/{name}``."""
    root = tmp / "servables"
    shutil.copytree(SERVABLES / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def start_main(servers, servable_dir: Path, name: str, devices: list[int], parallel: int = 0,
               **env: str) -> tuple[Proc, Rest]:
    port = free_port()
    proc = servers.start(["-c", SERVE, str(servable_dir), name, ",".join(map(str, devices)), str(parallel),
                          f"127.0.0.1:{port}"], f"server-{name}", env=child_env(**env))
    rest = Rest(port)
    rest.wait_ready(proc, 120)
    return proc, rest


def worker_pids(server: Proc) -> list[int]:
    return sorted(p for p in children_of(server.pid) if "servable_framework.worker" in cmdline(p))


def registered(server: Proc, pid: int) -> bool:
    """Main logged the READY registration of the Worker with ``pid``."""
    return re.search(rf"Register success: worker \w+ \(.*pid {pid}\) ready", server.log()) is not None


def worker_id(server: Proc, pid: int) -> str:
    found = re.search(rf"Register success: worker (\w+) \(.*pid {pid}\) ready", server.log())
    assert found, f"no registration of pid {pid} in Main's log"
    return found.group(1)


def echo_body(value: float, sleep_ms: float = 0) -> dict:
    return {"instances": [{"x": [value, value + 0.5], "sleep_ms": sleep_ms}]}


def answered_by(r: httpx.Response, value: float) -> int:
    """The pid of the Worker that answered ``echo_body(value)`` correctly (fails the test otherwise)."""
    assert r.status_code == 200, r.text
    instance = r.json()["instances"][0]
    assert instance["y"] == [value, value + 0.5]
    return int(instance["pid"])


@pytest.fixture
def echo_dir(tmp_path: Path) -> Path:
    return copy_servable(tmp_path, "failover_echo")


def test_kill_one_of_two_workers_under_load(servers, echo_dir) -> None:
    """2,000 requests at concurrency 8; one Worker SIGKILLed midway: every request is answered, none sent after
    Main noticed the death fails, the few in flight at the kill either were re-run on the survivor or fail
    with an error naming the dead Worker; the dead Worker is restarted."""
    server, rest = start_main(servers, echo_dir, "failover_echo", [0, 1])
    victim, survivor = worker_pids(server)
    total, concurrency = 2000, 8
    done = [0]
    lock = threading.Lock()
    times: dict[str, float] = {}
    client = httpx.Client(base_url=rest.base, timeout=60.0, limits=httpx.Limits(max_connections=2 * concurrency))

    def one(i: int) -> tuple[int, float, httpx.Response]:
        sent = time.monotonic()
        r = client.post("/model/failover_echo:echo", json=echo_body(float(i), sleep_ms=2))
        with lock:
            done[0] += 1
        return i, sent, r

    def victim_down() -> bool:
        workers = rest.get("/ready").json()["servables"]["failover_echo"]["workers"]
        return any(f"pid {victim})" in w["reason"] and w["state"] != "ready" for w in workers)

    def killer() -> None:
        wait_until(lambda: done[0] >= total // 2, 300, "half of the requests", interval_s=0.005)
        os.kill(victim, signal.SIGKILL)
        times["kill"] = time.monotonic()
        wait_until(victim_down, 10, "Main to notice the death", interval_s=0.01)
        times["detected"] = time.monotonic()

    kill_thread = threading.Thread(target=killer)
    kill_thread.start()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(total)))  # an exception here = a request without an answer
    finally:
        kill_thread.join(30)
        client.close()
    assert "detected" in times, "the kill did not happen while the requests ran"
    assert len(results) == total
    assert max(sent for _, sent, _ in results) > times["detected"], "no request was sent after the kill"
    failed = [(i, sent, r) for i, sent, r in results if r.status_code != 200]
    for _, sent, r in failed:  # in flight at the kill: the error names the dead Worker
        assert sent < times["detected"], f"a request sent after the death was noticed failed: {r.text}"
        assert r.status_code == 503 and "servable is not available" in r.json()["error_msg"]
        assert f"pid {victim})" in r.json()["error_msg"], r.text
    assert len(failed) <= concurrency, f"{len(failed)} requests failed: more than were in flight"
    pids = {i: answered_by(r, float(i)) for i, _, r in results if r.status_code == 200}
    after = [pids[i] for i, sent, _ in results if sent > times["detected"]]
    assert after and victim not in after
    assert survivor in after
    assert victim in pids.values() and survivor in pids.values(), "the load was not shared before the kill"
    print(f"\n{len(failed)} of {total} requests failed; re-runs logged by Main: "
          f"{server.log().count('re-running')}; {len(after)} sent after the death was noticed")
    # the dead Worker comes back and takes requests again
    wait_until(lambda: len(worker_pids(server)) == 2 and victim not in worker_pids(server), 60, "the restart")
    restarted = next(p for p in worker_pids(server) if p != survivor)
    wait_until(lambda: registered(server, restarted), 60, "the restarted Worker to register")
    seen: set[int] = set()

    def both_answer() -> bool:
        seen.add(answered_by(rest.post("/model/failover_echo:echo", echo_body(1.0, sleep_ms=20)), 1.0))
        return {restarted, survivor} <= seen

    wait_until(both_answer, 30, "both Workers to answer")
    assert server.alive() and survivor in worker_pids(server)


def test_worker_crashing_four_times_beside_a_healthy_one(servers, echo_dir) -> None:
    """One Worker is killed four times in a row, each time as soon as its restart registered (back-offs 1, 2
    and 4 s: the last is longer than the 3 s heartbeat timeout). Its healthy sibling answers every request
    the whole time, is never restarted, and the crashing one is given up after its third restart."""
    server, rest = start_main(servers, echo_dir, "failover_echo", [0, 1])
    victim, healthy = worker_pids(server)
    healthy_id = worker_id(server, healthy)
    log: list[tuple[float, int, str]] = []  # (answered at, pid or -1, error text)
    stop = threading.Event()

    def load(offset: int) -> None:
        with httpx.Client(base_url=rest.base, timeout=60.0) as client:
            i = offset
            while not stop.is_set():
                value = float(i)
                r = client.post("/model/failover_echo:echo", json=echo_body(value, sleep_ms=20))
                ok = r.status_code == 200 and r.json()["instances"][0]["y"] == [value, value + 0.5]
                log.append((time.monotonic(), int(r.json()["instances"][0]["pid"]) if ok else -1, r.text))
                i += 2

    threads = [threading.Thread(target=load, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    kills: list[float] = []
    try:
        current = victim
        for attempt in range(4):
            os.kill(current, signal.SIGKILL)
            kills.append(time.monotonic())
            if attempt == 3:
                break
            gone = {healthy, current}

            def restarted(gone: set[int] = gone) -> bool:
                fresh = [p for p in worker_pids(server) if p not in gone]
                return bool(fresh) and registered(server, fresh[0])

            wait_until(restarted, 90, f"restart {attempt + 1} of the crashing Worker")
            current = next(p for p in worker_pids(server) if p not in gone)
        wait_until(lambda: "restart limit (3) reached, giving up" in server.log(), 30, "Main to give up")
        time.sleep(4.0)  # longer than the heartbeat timeout: a starved sibling would have exited by now
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failures = [text for _, pid, text in log if pid == -1]
    assert not failures, f"{len(failures)} of {len(log)} requests failed, e.g. {failures[:3]}"
    # the healthy Worker answered in every period: between the kills, and after the last one
    bounds = [*kills, time.monotonic()]
    for start, end in zip(bounds, bounds[1:]):
        assert any(start <= t < end and pid == healthy for t, pid, _ in log), \
            f"the healthy Worker answered nothing between {start:.1f} and {end:.1f}"
    main_log = server.log()
    assert f"restarting worker {healthy_id} " not in main_log and "missed heartbeats" not in main_log
    assert worker_pids(server) == [healthy] and server.alive()
    assert rest.get("/health").status_code == 200  # a Worker is left: alive
    assert rest.is_ready()


def test_health_turns_unhealthy_once_the_restart_budget_is_spent(servers, echo_dir) -> None:
    """The only Worker dies; each restart dies while loading (its servable_config.py now fails): after the
    budget (2 here) ``/health`` answers 503 naming the servable, requests fail with 503, Main stays up."""
    server, rest = start_main(servers, echo_dir, "failover_echo", [0], SERVABLE_WORKER_RESTART_MAX="2")
    assert rest.get("/health").json() == {"status": "alive"}
    assert rest.get("/v2/health/live").json() == {"live": True}
    (echo_dir / "failover_echo" / "CRASH").write_text("")
    os.kill(worker_pids(server)[0], signal.SIGKILL)
    wait_until(lambda: rest.get("/health").status_code == 503, 60, "/health to turn unhealthy")
    body = rest.get("/health").json()
    assert body["status"] == "unhealthy"
    assert "servable 'failover_echo' version 1 has no Worker left (restart limit 2 reached)" in body["error_msg"]
    assert "exited with code" in body["error_msg"]
    live = rest.get("/v2/health/live")  # KServe's liveness follows the same rule
    assert live.status_code == 503 and live.json() == {"live": False}
    worker_log = next((echo_dir.parent / "serving_logs").glob("log_failover_echo_device0_*.log")).read_text()
    assert worker_log.count("worker start failed") == 2  # both restarts died while loading
    r = rest.post("/model/failover_echo:echo", echo_body(1.0))
    assert r.status_code == 503 and "servable is not available" in r.json()["error_msg"]
    assert server.alive() and not worker_pids(server)
    assert rest.get("/ready").status_code == 503


def test_restart_budget_is_whole_again_after_a_worker_served_a_while(servers, echo_dir) -> None:
    """Budget 1, reset after 2 s of serving: a Worker killed after serving for longer than that is restarted
    again (the budget stops crash loops, not rare crashes); killed at once after that restart registered, it is
    given up, so the budget still bounds a crash loop."""
    server, rest = start_main(servers, echo_dir, "failover_echo", [0], SERVABLE_WORKER_RESTART_MAX="1",
                              SERVABLE_RESTART_RESET_S="2")
    pids = worker_pids(server)

    def restart_of(gone: list[int]) -> int:
        def fresh() -> bool:
            now = [p for p in worker_pids(server) if p not in gone]
            return bool(now) and registered(server, now[0])

        wait_until(fresh, 90, "the Worker's restart to register")
        return next(p for p in worker_pids(server) if p not in gone)

    os.kill(pids[0], signal.SIGKILL)  # restart 1 of 1
    pids.append(restart_of(pids))
    served_since = time.monotonic()
    answered = 0
    while time.monotonic() - served_since < 3.0:  # serve past restart_reset_s (the duration is what is tested)
        assert answered_by(rest.post("/model/failover_echo:echo", echo_body(float(answered))),
                           float(answered)) == pids[-1]
        answered += 1
    os.kill(pids[-1], signal.SIGKILL)  # beyond the budget, but it served for 3 s: restarted
    pids.append(restart_of(pids))
    assert "its restart budget is whole again" in server.log()
    assert answered_by(rest.post("/model/failover_echo:echo", echo_body(7.0)), 7.0) == pids[-1]
    os.kill(pids[-1], signal.SIGKILL)  # at once: the renewed budget (1) is spent
    wait_until(lambda: "restart limit (1) reached, giving up" in server.log(), 30, "Main to give up")
    assert rest.get("/health").status_code == 503 and server.alive()
    assert server.log().count("its restart budget is whole again") == 1
