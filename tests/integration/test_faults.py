"""Kill real processes of a running distributed servable and check what everyone sees (issue: faults).

Cluster: Main + Distributed Worker + Agent startup process + 2 Agents (MatMul, TP=2, gloo). Each test kills
one process with SIGKILL or SIGTERM and asserts, within deadlines: the error a client sees (naming the rank
where an Agent is concerned), readiness, recovery or a clean stop, and that no process is left behind.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from tests.integration.test_matmul_distributed import start_cluster
from tests.support.procs import session_pids, wait_until

DETECT_S = 5.0
X = np.ones((8, 96)).tolist()
FAST_HEARTBEAT = {"SERVABLE_HEARTBEAT_INTERVAL_S": "0.5", "SERVABLE_HEARTBEAT_TIMEOUT_S": "2"}


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def agent_pids(agents_proc) -> list[int]:
    return sorted(p for p in children_of(agents_proc.pid) if "servable_framework.agent" in cmdline(p))


def worker_pid(server) -> int:
    return next(p for p in children_of(server.pid) if "servable_framework.worker" in cmdline(p))


def predict(rest) -> httpx.Response:
    return rest.post("/model/matmul:predict", {"instances": [{"x": X}]})


def correct(r: httpx.Response) -> bool:
    return r.status_code == 200 and (np.array(r.json()["instances"][0]["y"]) == -48.0).all()


@pytest.fixture
def cluster(servers, matmul_dir):
    server, agents, rest, _ = start_cluster(servers, matmul_dir(2), 2, **FAST_HEARTBEAT)
    rest.wait_ready(server, 120)
    assert correct(predict(rest))
    yield server, agents, rest
    rest.close()


def wait_error(rest, fragment: str, timeout_s: float = DETECT_S) -> str:
    """Poll with real requests until one fails with ``fragment``; returns the error text."""
    seen: list[str] = []

    def check() -> bool:
        r = predict(rest)
        if r.status_code != 200:
            seen.append(r.json()["error_msg"])
            return fragment in seen[-1]
        return False

    wait_until(check, timeout_s, f"an error containing {fragment!r} (saw {seen[-3:]})", interval_s=0.05)
    return seen[-1]


def assert_all_gone(timeout_s: float = 30.0) -> None:
    wait_until(lambda: not session_pids(), timeout_s, "every process of the servable to exit")


def stop_and_check(server, agents) -> None:
    """SIGTERM on Main must take the whole servable down, Agents included, without the test killing them."""
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0  # a clean exit, not a crash
    agents.wait(30)
    assert_all_gone()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_one_agent_killed_then_recovers(cluster, sig) -> None:
    server, agents, rest = cluster
    victim = agent_pids(agents)[1]
    t0 = time.monotonic()
    os.kill(victim, sig)
    error = wait_error(rest, "rank 1")
    assert time.monotonic() - t0 < DETECT_S
    assert "servable is not available" in error
    assert rest.get("/ready").status_code == 503
    wait_until(lambda: rest.is_ready(), 60, "recovery")
    assert correct(predict(rest))
    assert victim not in agent_pids(agents)
    stop_and_check(server, agents)


def test_agent_startup_process_killed(cluster, servers, matmul_dir) -> None:
    server, agents, rest = cluster
    old = agent_pids(agents)
    t0 = time.monotonic()
    agents.signal(signal.SIGKILL)
    error = wait_error(rest, "rank")
    assert time.monotonic() - t0 < DETECT_S and "servable is not available" in error
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") and "agent" in cmdline(p) for p in old), DETECT_S,
               "the orphaned agents to exit")
    # restarted by hand, the Agents re-join the running servable: no restart of Main
    address = agents.popen.args[agents.popen.args.index("tests.support.agents") + 1]
    again = servers.start(["-m", "tests.support.agents", address, *agents.popen.args[-2:]], "agents-again")
    wait_until(lambda: rest.is_ready(), 90, "recovery with new agents")
    assert correct(predict(rest))
    stop_and_check(server, again)


def test_distributed_worker_killed(cluster) -> None:
    server, agents, rest = cluster
    t0 = time.monotonic()
    os.kill(worker_pid(server), signal.SIGKILL)
    error = wait_error(rest, "servable is not available")
    assert time.monotonic() - t0 < DETECT_S
    assert "exited with code -9" in error or "unreachable" in error
    # Main restarts the Worker; the Agents notice their Worker vanished and re-join the new one
    wait_until(lambda: rest.is_ready(), 90, "recovery after the worker restart")
    assert correct(predict(rest))
    assert server.alive() and agents.alive()
    stop_and_check(server, agents)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_main_killed_takes_everything_down(cluster, sig) -> None:
    server, agents, rest = cluster
    server.signal(sig)
    # nobody else is signalled: the Worker (death pipe) and the Agents (told by the Worker) leave on their own
    agents.wait(30)
    assert_all_gone()


def test_agent_killed_during_a_stream_of_requests(cluster) -> None:
    server, agents, rest = cluster
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=rest.base, timeout=30) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post("/model/matmul:predict", json={"instances": [{"x": X}]})
                except httpx.HTTPError as exc:  # a lost or hung request
                    outcomes.append((time.monotonic() - t0, f"transport error {exc!r}"))
                    continue
                if correct(r):
                    outcomes.append((time.monotonic() - t0, "ok"))
                else:
                    outcomes.append((time.monotonic() - t0, r.json().get("error_msg", r.text)))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(outcomes) >= 20, 30, "traffic")
    os.kill(agent_pids(agents)[0], signal.SIGKILL)
    wait_until(lambda: any(o != "ok" for _, o in outcomes), DETECT_S, "the failure to show")
    wait_until(lambda: rest.is_ready(), 60, "recovery")
    n = len(outcomes)
    wait_until(lambda: sum(o == "ok" for _, o in outcomes[n:]) >= 20, 30, "correct answers after recovery")
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client is hung"
    errors = [o for _, o in outcomes if o != "ok"]
    assert errors, "the kill was not noticed by any client"
    for e in errors:
        assert "servable is not available" in e and ("rank" in e or "agents are not ready" in e), e
    assert max(d for d, _ in outcomes) < 10, "a request waited too long"
    stop_and_check(server, agents)


@pytest.mark.parametrize("when", ["at_once", "after_detection"])
def test_main_stopped_while_agents_rejoin(cluster, when) -> None:
    """Main stopped while the Agents are between generations (one was killed, the survivor was told to re-join,
    its startup process waits for a config): the Worker's final EXIT reaches the startup process itself, so it
    stops at once instead of waiting out the 60 s config timeout for a Worker that is gone for good."""
    server, agents, rest = cluster
    os.kill(agent_pids(agents)[1], signal.SIGKILL)
    if when == "after_detection":  # the Worker retired the group: no Agent is registered when it closes
        wait_error(rest, "rank 1")
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    agents.wait(30)  # without the final EXIT to the startup process: 60 s and more
    assert_all_gone()


def test_failure_on_one_rank_mid_batch_reforms_the_group(servers, matmul_dir) -> None:
    """An exception on rank 1 after rank 0 entered a collective (the ranks are out of step) fails that request
    with an error naming rank 1 within seconds, not after the 120 s group timeout; the group re-forms and the
    servable answers correctly again without restarting Main."""
    from tests.support.faulty import TRIGGER

    root = matmul_dir(2)
    config = root / "matmul" / "servable_config.py"
    config.write_text(config.read_text().replace('shard="matmul"', 'shard="tests.support.faulty:FaultyMatMulShard"'))
    server, agents, rest, _ = start_cluster(servers, root, 2, **FAST_HEARTBEAT)
    rest.wait_ready(server, 120)
    assert correct(predict(rest))
    pids = agent_pids(agents)
    bad = np.ones((8, 96))
    bad[0, 0] = TRIGGER
    t0 = time.monotonic()
    r = rest.post("/model/matmul:predict", {"instances": [{"x": bad.tolist()}]})
    assert time.monotonic() - t0 < DETECT_S
    assert r.status_code in (500, 503), r.text
    assert "rank 1" in r.json()["error_msg"] and "injected fault" in r.json()["error_msg"], r.text
    wait_until(lambda: rest.is_ready(), 60, "the group to re-form")
    assert correct(predict(rest))
    assert set(agent_pids(agents)).isdisjoint(pids)  # every rank re-joined as a new process (a new generation)
    stop_and_check(server, agents)


def test_hung_rank_is_detected_by_the_step_timeout(servers, matmul_dir) -> None:
    """Rank 1 hangs mid-batch while its process stays alive and answers heartbeats: the batch fails after the
    step timeout (2 s here, 30 s by default; the torch.distributed timeout is 120 s) with an error naming the
    rank, and the group re-forms."""
    from tests.support.faulty import HANG

    root = matmul_dir(2)
    config = root / "matmul" / "servable_config.py"
    config.write_text(config.read_text().replace('shard="matmul"', 'shard="tests.support.faulty:FaultyMatMulShard"'))
    server, agents, rest, _ = start_cluster(servers, root, 2, SERVABLE_STEP_TIMEOUT_S="2", **FAST_HEARTBEAT)
    rest.wait_ready(server, 120)
    hung = np.ones((8, 96))
    hung[0, 0] = HANG
    t0 = time.monotonic()
    r = rest.post("/model/matmul:predict", {"instances": [{"x": hung.tolist()}]})
    assert 2.0 <= time.monotonic() - t0 < 2.0 + DETECT_S, time.monotonic() - t0
    assert r.status_code == 503 and "made no step for 2 s" in r.json()["error_msg"], r.text
    wait_until(lambda: rest.is_ready(), 60, "the group to re-form")
    assert correct(predict(rest))
    stop_and_check(server, agents)


def test_agent_restart_budget_is_whole_again_after_it_served_a_while(servers, matmul_dir) -> None:
    """``max_restarts=1``, reset after 2 s of serving: rank 1 killed after serving longer than that is restarted
    again; killed at once after that restart, it exceeds the renewed budget and this host's Agents stop."""
    server, agents, rest, _ = start_cluster(servers, matmul_dir(2), 2, agent_args=("--max-restarts", "1"),
                                            SERVABLE_RESTART_RESET_S="2", **FAST_HEARTBEAT)
    rest.wait_ready(server, 120)

    def rank_1() -> int:  # its current process (standby interpreters are Agent processes too)
        pids = [int(p) for p in re.findall(r"agent1\[(\d+)\]", agents.log())]
        return next(p for p in reversed(pids) if p in agent_pids(agents))

    def kill_rank_1_and_recover() -> None:
        victim = rank_1()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in agent_pids(agents) and rest.is_ready() and correct(predict(rest)), 60,
                   "recovery")

    kill_rank_1_and_recover()  # restart 1 of 1
    served_since = time.monotonic()
    while time.monotonic() - served_since < 3.0:  # serve past restart_reset_s (the duration is what is tested)
        assert correct(predict(rest))
    kill_rank_1_and_recover()  # beyond the budget, but it served for 3 s: restarted
    assert agents.log().count("its restart budget is whole again") == 1
    os.kill(rank_1(), signal.SIGKILL)  # at once: the renewed budget is spent
    wait_until(lambda: "exceeded 1 restarts" in agents.log() or not agents.alive(), 30, "the Agents to give up")
    assert "reached the restart limit 1" in agents.log()
    assert not correct(predict(rest)) and server.alive()
    rest.close()
