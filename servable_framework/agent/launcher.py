"""The Agent startup process: `startup_agents` spawns one Agent per local rank and supervises them.

It fetches the agent config from the Distributed Worker (retrying until ``config_timeout_s``), picks this
host's ranks from the rank table, checks the model files, spawns the Agents and waits until every one says
ready (or one fails: then all are stopped, the Worker is told, and the call raises). Afterwards a
supervisor thread (non-daemon: it keeps ``serving_agent.py`` alive) restarts Agents:

* an Agent that exits with `EXIT_REJOIN` (its group broke, or the Worker vanished) is started again for the
  next generation, with a fresh config;
* an Agent that crashed or was killed is restarted with back-off, at most ``max_restarts`` times per rank;
* exit code 0 means the servable was stopped: the supervisor stops everything and ends; so does an EXIT
  the Worker sends over the `WorkerLink` when it stops for good (it reaches Agents between generations too).

Every Agent holds a death pipe to this process, so SIGKILL on it takes its Agents down too.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any

from servable_framework import procs
from servable_framework.agent.agent import EXIT_REJOIN
from servable_framework.agent.worker_link import ServableStopped, WorkerLink
from servable_framework.logs import setup_logging
from servable_framework.settings import Settings
from servable_framework.wire import Kind

log = logging.getLogger("servable_framework.agent_startup")


def local_ranks(ranks: list[tuple[str, int]], rank_start: int | None, count: int | None) -> list[int]:
    """The ranks this host runs: those sharing the ip of ``rank_start`` (from it on), else of the first local ip."""
    if rank_start is not None:
        if not 0 <= rank_start < len(ranks):
            raise RuntimeError(f"Parameter 'rank_start' should be in range [0,{len(ranks) - 1}]")
        ip = ranks[rank_start][0]
        chosen = [r for r, (rip, _) in enumerate(ranks) if rip == ip and r >= rank_start]
    else:
        ip = next((rip for rip, _ in ranks if _is_local_ip(rip)), "")
        if not ip:
            raise RuntimeError("None of the rank table's server ips belongs to this machine; pass rank_start")
        chosen = [r for r, (rip, _) in enumerate(ranks) if rip == ip]
    return chosen[:count] if count else chosen


def _is_local_ip(ip: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


@dataclass
class _AgentProc:
    rank: int
    model_files: list[str]
    child: procs.Child
    status_r: int
    restarts: int = 0


class AgentSupervisor:
    def __init__(self, link: WorkerLink, ranks: list[int], model_files: list[list[str]], config: dict[str, Any],
                 max_restarts: int, config_timeout_s: float) -> None:
        self.link = link
        self.address = link.address
        self.config = config
        self.max_restarts = max_restarts
        self.config_timeout_s = config_timeout_s
        self.stopping = threading.Event()
        self.agents: dict[int, _AgentProc] = {}
        self._plan = list(zip(ranks, model_files))
        # torch threads per Agent: SERVABLE_AGENT_THREADS, else this host's cores shared among its Agents
        self.threads = Settings.from_env().agent_thread_count(len(ranks))

    def _spawn(self, rank: int, files: list[str], restarts: int = 0) -> _AgentProc:
        status_r, status_w = os.pipe()
        device_id = int(self.config["ranks"][rank][1])
        payload = {"rank": rank, "device_id": device_id, "model_files": files, "config": self.config,
                   "distributed_address": self.address, "status_fd": status_w, "threads": self.threads}
        name = f"{self.config['servable']}_worker_agent_rank{rank}_device{device_id}"
        try:
            child = procs.spawn("servable_framework.agent", payload, name, extra_fds=[status_w])
        finally:
            os.close(status_w)  # only the child holds the write end: EOF on status_r means it exited
        agent = _AgentProc(rank, files, child, status_r, restarts)
        self.agents[rank] = agent
        return agent

    def start(self) -> None:
        """Spawn every local Agent and wait until all are ready; on any failure stop all and raise."""
        for rank, files in self._plan:
            self._spawn(rank, files)
        waiting = {a.status_r: a for a in self.agents.values()}
        while waiting:
            self.link.poll()
            if self.link.stopped.is_set():
                self.stop_all()
                raise RuntimeError("the distributed worker stopped the servable while the agents were starting")
            readable, _, _ = select.select(list(waiting), [], [], 0.5)
            for fd in readable:
                agent = waiting.pop(fd)
                line = os.read(fd, 8192)
                if line.startswith(b"R"):
                    log.info("Child %d: rank %d ready", agent.rank, agent.rank)
                    continue
                error = line[1:].decode(errors="replace").strip() if line.startswith(b"F") else \
                    f"agent rank {agent.rank} exited during start-up (code {agent.child.proc.wait()})"
                self.link.notify(Kind.FAILED, error)  # the cause first, then the exits it causes
                self.stop_all()
                raise RuntimeError(f"Failed to start agents: {error}")
        # non-daemon: keeps serving_agent.py alive after startup_agents returns
        threading.Thread(target=self._supervise, name="agent-supervisor", daemon=False).start()

    def _supervise(self) -> None:
        while not self.stopping.is_set():
            fds = {a.status_r: a for a in self.agents.values()}
            if not fds:
                break
            self.link.poll()
            if self.link.stopped.is_set():
                self.stop_all()
                break
            readable, _, _ = select.select(list(fds), [], [], 0.5)
            for fd in readable:
                agent = fds[fd]
                if os.read(fd, 8192):
                    continue  # a status line ("ready" after a restart)
                os.close(fd)
                self._on_exit(agent, agent.child.proc.wait())
        self.link.close()
        log.info("agent supervisor finished")

    def _on_exit(self, agent: _AgentProc, code: int) -> None:
        del self.agents[agent.rank]
        if self.stopping.is_set():
            return
        if code == 0:
            log.info("rank %d exited: the servable was stopped; stopping this host's agents", agent.rank)
            self.stop_all()
            return
        restarts = agent.restarts
        lost: list[dict[str, Any]] = []
        if code != EXIT_REJOIN:
            # tell the Worker now, not after its heartbeat timeout: in-flight requests fail at once
            lost = [{"rank": agent.rank, "pid": agent.child.pid, "error": f"died (exit code {code})"}]
            self.link.notify(Kind.FAILED, lost[0]["error"], rank=agent.rank, pid=agent.child.pid)
            restarts += 1
            if restarts > self.max_restarts:
                log.error("rank %d died (code %d) and reached the restart limit %d; stopping this host's agents",
                          agent.rank, code, self.max_restarts)
                self.stop_all()
                self.link.notify(Kind.FAILED, f"rank {agent.rank} exceeded {self.max_restarts} restarts")
                return
            delay = min(0.5 * 2 ** (restarts - 1), 5.0)
            log.warning("rank %d died (code %d); restarting it in %.1f s (%d/%d)", agent.rank, code, delay, restarts,
                        self.max_restarts)
            if self.stopping.wait(delay):
                return
        else:
            log.info("rank %d leaves the broken group; starting it again for the next generation", agent.rank)
        try:
            self.config = self.link.fetch_config(self.config_timeout_s, lost, self.stopping.is_set)
        except ServableStopped:
            log.info("the servable was stopped while rank %d waited to re-join; stopping this host's agents",
                     agent.rank)
            self.stop_all()
            return
        except RuntimeError as exc:
            log.error("%s; stopping this host's agents", exc)
            self.stop_all()
            return
        self._spawn(agent.rank, agent.model_files, restarts)

    def stop_all(self) -> None:
        """Stop every local Agent (SIGTERM, then SIGKILL). Idempotent; callable from any thread."""
        self.stopping.set()
        agents = list(self.agents.values())
        procs.terminate([a.child for a in agents], grace_s=10.0)
        for a in agents:
            try:
                os.close(a.status_r)
            except OSError:
                pass
        self.agents.clear()


def startup_agents(distributed_address: str, model_files: Any, group_config_files: Any = None,
                   agent_start_port: int = 7000, agent_ip: str | None = None, rank_start: int | None = None,
                   dec_key: bytes | None = None, dec_mode: str = "AES-GCM", *, max_restarts: int = 3,
                   config_timeout_s: float = 60.0) -> None:
    """Implementation of `servable_framework.server.distributed.startup_agents` (documented there)."""
    from servable_framework.servable import checks
    from servable_framework.server.start_config import resolve_path

    setup_logging("agent-startup")
    checks.check_str("distributed_address", distributed_address)
    checks.check_int("agent_start_port", agent_start_port, 1, 65535 - 7)
    if rank_start is not None:
        checks.check_int("rank_start", rank_start, 0)
    if agent_ip is not None:
        checks.check_str("agent_ip", agent_ip)
    if dec_key is not None:
        raise RuntimeError("Parameter 'dec_key': model decryption is not supported by servable_framework")
    if not isinstance(model_files, (list, tuple)) or not model_files:
        raise RuntimeError("Parameter 'model_files' should be a non-empty list/tuple of str or of lists of str")
    files = [[f] if isinstance(f, str) else list(f) for f in model_files]
    for group in files:
        if not group or not all(isinstance(f, str) and f for f in group):
            raise RuntimeError("The item of parameter 'model_files' should be str or a list of str")
    files = [[resolve_path(f) for f in group] for group in files]
    link = WorkerLink(distributed_address)
    config = link.fetch_config(config_timeout_s)
    ranks = local_ranks([(ip, int(d)) for ip, d in config["ranks"]], rank_start,
                        len(files) if rank_start is not None else None)
    if len(files) != len(ranks):
        raise RuntimeError(f"Card count {ranks} described rank table does not equal to model files size {len(files)}")
    for group in files:
        for f in group:
            if not os.access(f, os.R_OK):
                raise RuntimeError(f"Cannot access model file '{f}'")
    log.info("starting agents for ranks %s of servable '%s' (%d ranks, %d stages)", ranks, config["servable"],
             config["rank_size"], config["stage_size"])
    sup = AgentSupervisor(link, ranks, files, config, max_restarts, config_timeout_s)
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s, stopping agents", signal.Signals(signum).name)
            threading.Thread(target=_stop_and_notify, args=(sup,), daemon=False).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    sup.start()
    log.info("all %d local agents are ready", len(ranks))


def _stop_and_notify(sup: AgentSupervisor) -> None:
    # told first: once the Agents are stopped the supervisor thread ends and closes the link
    sup.link.notify(Kind.EXIT, "the agent startup process was stopped")
    sup.stop_all()
