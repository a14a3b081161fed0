"""The Agent startup process: `startup_agents` spawns one Agent per local rank and supervises them.

It fetches the agent config from the Distributed Worker (retrying until ``config_timeout_s``), picks this
host's ranks from the rank table, checks the model files, spawns the Agents and waits until every one says
ready (or one fails: then all are stopped, the Worker is told, and the call raises). Afterwards a
supervisor thread (non-daemon: it keeps ``serving_agent.py`` alive) restarts Agents:

* an Agent that exits with `EXIT_REJOIN` (its group broke, or the Worker vanished) is started again for the
  next generation, with a fresh config;
* an Agent that crashed or was killed is restarted with back-off, at most ``max_restarts`` times in a row per
  rank; a rank that served `Settings.restart_reset_s` since its last restart has its whole budget again;
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
import time
from dataclasses import dataclass
from typing import Any

from servable_framework import crypto, curve, netif, procs
from servable_framework.agent.agent import EXIT_REJOIN, WARM_SHARD_ENV
from servable_framework.agent.config import AgentConfig, AgentPayload
from servable_framework.agent.worker_link import ServableStopped, WorkerLink
from servable_framework.logs import setup_logging
from servable_framework.settings import Settings
from servable_framework.wire import Kind

log = logging.getLogger("servable_framework.agent_startup")


def local_ranks(ranks: list[tuple[str, int]], rank_start: int | None) -> list[int]:
    """The ranks this host runs (contract §6.3): every rank of the ip of ``rank_start``, else of the first rank
    table ip that belongs to this machine."""
    if rank_start is not None:
        if rank_start >= len(ranks):
            raise RuntimeError(f"Parameter 'rank_start' cannot equal or larger than rank size {len(ranks)}.")
        ip = ranks[rank_start][0]
        if not _is_local_ip(ip):  # its Agents' collectives listen on that address (`agent.bind_collectives`)
            raise RuntimeError(netif.not_local_message(ip, f"The rank table host of rank {rank_start}"))
    else:
        ip = next((rip for rip, _ in ranks if _is_local_ip(rip)), "")
        if not ip:
            raise RuntimeError(f"Get local machine ip failed, rank table ips: {sorted({rip for rip, _ in ranks})}, "
                               f"this machine's addresses: {', '.join(netif.local_addresses())}")
    return [r for r, (rip, _) in enumerate(ranks) if rip == ip]


def _is_local_ip(ip: str) -> bool:
    """Whether ``ip`` (an IPv4 or IPv6 address, or a host name) can be bound here: one of this machine's addresses
    (or a wildcard)."""
    try:
        family, kind, _, _, sockaddr = socket.getaddrinfo(ip, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as s:
            s.bind(sockaddr)
        return True
    except (OSError, IndexError):
        return False


@dataclass
class _AgentProc:
    rank: int
    model_files: list[str]
    child: procs.Child
    status_r: int
    restarts: int = 0  # restarts in a row (see `Settings.restart_reset_s`)
    ready_at: float | None = None  # monotonic time this process said ready


@dataclass
class _Process:
    """A started Agent interpreter, a standby until it is given a payload (`procs.spawn`)."""

    child: procs.Child
    status_r: int  # our end of its status pipe ("R" ready / "F" failed, EOF when it exits)
    status_fd: int  # the child's end: the same number in the child (pass_fds keeps numbers)


class AgentSupervisor:
    def __init__(self, link: WorkerLink, ranks: list[int], model_files: list[list[str]], config: AgentConfig,
                 max_restarts: int, config_timeout_s: float, decryption: crypto.ModelKey | None = None) -> None:
        self.link = link
        self.decryption = decryption
        self.address = link.address
        self.config = config
        self.max_restarts = max_restarts
        self.config_timeout_s = config_timeout_s
        self.stopping = threading.Event()
        self.agents: dict[int, _AgentProc] = {}
        self._plan = list(zip(ranks, model_files))
        settings = Settings.from_env()
        # torch threads per Agent: SERVABLE_AGENT_THREADS, else this host's cores shared among its Agents
        self.threads = settings.agent_thread_count(len(ranks))
        self.use_standby = settings.agent_standby
        self.restart_reset_s = settings.restart_reset_s
        self.standby: dict[int, _Process] = {}  # rank -> its pre-started replacement (see Settings.agent_standby)
        self._standby_lock = threading.Lock()

    def _start_process(self, rank: int, standby: bool) -> _Process:
        status_r, status_w = os.pipe()
        device_id = self.config.ranks[rank][1]
        name = f"{self.config.servable}_worker_agent_rank{rank}_device{device_id}" + ("_standby" if standby else "")
        try:
            child = procs.spawn("servable_framework.agent", None, name, extra_fds=[status_w],
                                env={WARM_SHARD_ENV: self.config.shard} if standby else None)
        finally:
            os.close(status_w)  # only the child holds the write end: EOF on status_r means it exited
        return _Process(child, status_r, status_w)

    def _spawn(self, rank: int, files: list[str], restarts: int = 0) -> _AgentProc:
        """Start rank ``rank``'s Agent: its standby when one is alive (torch already imported: it joins in a
        fraction of a second), else a fresh interpreter; then start the next standby for that rank."""
        proc = self.standby.pop(rank, None)
        if proc is not None and not proc.child.alive():
            os.close(proc.status_r)
            proc = None
        if proc is None:
            proc = self._start_process(rank, standby=False)
        payload = AgentPayload(rank=rank, device_id=self.config.ranks[rank][1], model_files=files, config=self.config,
                               distributed_address=self.address, status_fd=proc.status_fd, threads=self.threads,
                               keys_dir=str(self.link.keys.directory) if self.link.keys is not None else None
                               ).model_dump(mode="json")
        if self.decryption is not None:  # the Agent takes it out at once (`crypto.process_key`); never logged
            payload[crypto.PAYLOAD_FIELD] = self.decryption.to_payload()
        proc.child.give_payload(payload)
        agent = _AgentProc(rank, files, proc.child, proc.status_r, restarts)
        self.agents[rank] = agent
        return agent

    def _refill_standby(self) -> None:
        """One standby per local rank (started after the Agents are up, so they do not compete at start)."""
        with self._standby_lock:  # never one more after stop_all took them
            for rank, _ in self._plan:
                if self.use_standby and not self.stopping.is_set() and rank not in self.standby:
                    self.standby[rank] = self._start_process(rank, standby=True)

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
                    agent.ready_at = time.monotonic()
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
        self._refill_standby()
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
                line = os.read(fd, 8192)
                if line:  # a status line: "ready" after a restart
                    if line.startswith(b"R"):
                        agent.ready_at = time.monotonic()
                    continue
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
        served_s = time.monotonic() - agent.ready_at if agent.ready_at is not None else 0.0
        if restarts and served_s >= self.restart_reset_s:
            log.info("rank %d served for %.0f s since its last restart: its restart budget is whole again",
                     agent.rank, served_s)
            restarts = 0
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
            # the first restart at once (a one-off crash); a rank that keeps dying backs off
            delay = 0.0 if restarts == 1 else min(0.5 * 2 ** (restarts - 2), 5.0)
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
        self._refill_standby()

    def stop_all(self) -> None:
        """Stop every local Agent (SIGTERM, then SIGKILL). Idempotent; callable from any thread."""
        self.stopping.set()
        with self._standby_lock:
            standby, self.standby = list(self.standby.values()), {}
        agents = list(self.agents.values())
        procs.terminate([a.child for a in agents] + [p.child for p in standby], grace_s=10.0)
        for fd in [a.status_r for a in agents] + [p.status_r for p in standby]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.agents.clear()


def startup_agents(distributed_address: str, model_files: Any, group_config_files: Any = None,
                   agent_start_port: int = 7000, agent_ip: str | None = None, rank_start: int | None = None,
                   dec_key: bytes | None = None, dec_mode: str = "AES-GCM", *, max_restarts: int = 3,
                   config_timeout_s: float = 60.0, keys_dir: str | None = None) -> None:
    """Start this host's Agents of the servable the Distributed Worker at ``distributed_address`` serves, and return
    once all are ready (`servable_framework.server.distributed.startup_agents`, contract §6.3).

    Args:
        distributed_address: the Distributed Worker's ``"ip:port"``.
        model_files: one file (or one list of sub-graph files) per local rank, in rank order; relative paths are
            relative to the launching script.
        group_config_files: None, or one file per local rank (checked for access; torch.distributed needs none).
        agent_start_port: in [1, 65528].
        agent_ip, rank_start: both None (this host = the first rank table ip of this machine) or both given (this
            host = the rank table ip of ``rank_start``; ``agent_ip`` must be an address of this machine).
        dec_key, dec_mode: key (16/24/32 bytes) and mode ("AES-GCM"/"AES-CBC") of encrypted model files
            (`servable_framework.crypto`); each Agent decrypts its files in memory. Never logged.

    Every argument rule of contract §6.3 is checked before an Agent is spawned; those that need no rank table
    (types, ``agent_start_port``, ``agent_ip``/``rank_start`` pairing, file list shapes, ``dec_key``/``dec_mode``)
    even before the Worker is asked for its config.

    ``keys_dir`` (default ``$SERVABLE_KEYS_DIR``): CurveZMQ keys (`servable_framework.curve`) this host's Agents
    and this process present to the Distributed Worker; required when ``distributed_address`` is not loopback.
    """
    from servable_framework.servable import checks

    setup_logging("agent-startup")
    checks.check_str("distributed_address", distributed_address)
    checks.check_int("agent_start_port", agent_start_port, 1, 65535 - 7)
    files = _file_lists("model_files", model_files)
    groups = None if group_config_files is None else _file_lists("group_config_files", group_config_files)
    _check_file_counts(files, groups, model_files, group_config_files)
    decryption = crypto.check_key(dec_key, dec_mode)
    if (agent_ip is None) != (rank_start is None):
        raise RuntimeError("Parameter 'agent_ip' and parameter 'rank_start' must have values at the same time, "
                           "or both None at the same time.")
    if agent_ip is not None:
        checks.check_str("agent_ip", agent_ip)
        checks.check_int("rank_start", rank_start, 0)
        if not _is_local_ip(agent_ip):
            raise RuntimeError(f"Check ip 'agent_ip' valid failed, agent_ip: {agent_ip}")
    # CurveZMQ keys (default $SERVABLE_KEYS_DIR): a Distributed Worker off loopback accepts authorized keys only
    keys = curve.resolve(keys_dir)
    curve.require_client_keys(distributed_address, keys, "An Agent")
    link = WorkerLink(distributed_address, keys)
    try:
        config = link.fetch_config(config_timeout_s)
        ranks = local_ranks(list(config.ranks), rank_start)
        if len(files) != len(ranks):
            raise RuntimeError(f"Card count {[config.ranks[r][1] for r in ranks]} described rank table does "
                               f"not equal to model files size {len(files)}, model files: {model_files}")
        files = [[_readable(f, "model file") for f in group] for group in files]
        for group in groups or []:
            for f in group:
                _readable(f, "group config file")
    except BaseException:
        link.close()
        raise
    log.info("starting agents for ranks %s of servable '%s' (%d ranks, %d stages)%s", ranks, config.servable,
             config.rank_size, config.stage_size,
             f", model files encrypted ({decryption.mode})" if decryption else "")
    sup = AgentSupervisor(link, ranks, files, config, max_restarts, config_timeout_s, decryption)
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s, stopping agents", signal.Signals(signum).name)
            threading.Thread(target=_stop_and_notify, args=(sup,), daemon=False).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    sup.start()
    log.info("all %d local agents are ready", len(ranks))


def _file_lists(name: str, value: Any) -> list[list[str]]:
    """``model_files`` / ``group_config_files``: str, or a list/tuple of str or of lists of str (one list per
    rank: several sub-graphs). Relative paths are resolved later (`_readable`)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise RuntimeError(f"Parameter '{name}' should be str or tuple/list of str, but actually {type(value)}")
    if not value:
        raise RuntimeError(f"Parameter '{name}' should not be empty")
    out = []
    for item in value:
        group = item if isinstance(item, (list, tuple)) else [item]
        for f in group:
            if not isinstance(f, str):
                raise RuntimeError(f"The item of parameter '{name}' should be str, but actually {type(f)}")
            if not f:
                raise RuntimeError(f"The item of parameter '{name}' should not be empty str")
        if not group:
            raise RuntimeError(f"The item of parameter '{name}' should not be an empty list")
        out.append(list(group))
    return out


def _check_file_counts(files: list[list[str]], groups: list[list[str]] | None, model_files: Any,
                       group_config_files: Any) -> None:
    """MindSpore's rules: every rank has as many model files (sub-graphs); at most one group file per rank, one
    list per rank like the model files."""
    if len({len(g) for g in files}) > 1:
        raise RuntimeError(f"please check the number of  model files and group config files, model files: "
                           f"{model_files}, group config files: {group_config_files}")
    if groups is None:
        return
    if len(files) != len(groups):
        raise RuntimeError(f"Model files count {len(files)} does not equal to group config files count "
                           f"{len(groups)} when group_config_files is not None, model files: {model_files}, "
                           f"group config files: {group_config_files}")
    if any(len(g) != 1 for g in groups):
        raise RuntimeError("please check the number of  group config files, currently only support one at most")


def _readable(path: str, what: str) -> str:
    from servable_framework.server.start_config import resolve_path

    full = os.path.realpath(resolve_path(path))
    if not os.access(full, os.R_OK):
        raise RuntimeError(f"Cannot access {what} '{full}'")
    return full


def _stop_and_notify(sup: AgentSupervisor) -> None:
    # told first: once the Agents are stopped the supervisor thread ends and closes the link
    sup.link.notify(Kind.EXIT, "the agent startup process was stopped")
    sup.stop_all()
