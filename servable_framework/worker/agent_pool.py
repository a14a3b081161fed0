"""The Distributed Worker's side of its Agents: control plane (`AgentPool`) and data plane (`DistributedBackend`).

Control plane, on ``distributed_address`` (a ROUTER):
* CONFIG: an Agent startup process asks for the servable's agent config (answered only after the rank
  table was parsed and checked against the declaration);
* REGISTER: an Agent joined generation ``g`` of the torch.distributed group and loaded its shard;
* PING/PONG both ways; FAILED/EXIT from Agents or their startup process.

The pool owns the torch.distributed rendezvous (a TCPStore; each *generation* uses its own key prefix), so
when an Agent dies or goes silent the pool fails every batch in flight with an error naming the rank, tells
the surviving Agents to leave the broken group, bumps the generation and waits for all ranks to register
again (restarted by their startup process). When they are back the servable is available again, without
restarting Main.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import zmq
import zmq.asyncio

from servable_framework import curve, transport
from servable_framework.agent.config import AgentConfig, AgentHeartbeat
from servable_framework.errors import ServingError, StartupError, Unavailable
from servable_framework.rank_table import RankInfo, check_against_declaration, parse_rank_table
from servable_framework.servable.spec import ModelSpec, ServableSpec
from servable_framework.wire import Kind, Value, decode_value, encode_value, unpack
from servable_framework.worker.batcher import PieceSink
from servable_framework.worker.cancel import CancelToken

log = logging.getLogger("servable_framework.agents")

# how long a failed first start waits for the report that names the cause, after a consequence (an exit) came first
START_CAUSE_GRACE_S = 1.0


class PoolState(str, enum.Enum):
    WAITING = "waiting"  # for all ranks of the current generation
    READY = "ready"
    STOPPED = "stopped"


@dataclass
class AgentHandle:
    rank: int
    identity: bytes
    pid: int
    last_seen: float = field(default_factory=time.monotonic)


class AgentPool:
    def __init__(self, ctx: zmq.asyncio.Context, spec: ServableSpec, dist_cfg: dict[str, Any],
                 heartbeat: dict[str, float], on_failure: Callable[[str], None],
                 on_recovered: Callable[[], None]) -> None:
        model = spec.distributed_model
        assert model is not None and model.distributed is not None
        self.spec = spec
        self.model: ModelSpec = model
        self.dist = model.distributed
        self.cfg = dist_cfg
        self.heartbeat = heartbeat
        self.on_failure = on_failure
        self.on_recovered = on_recovered
        self.ever_ready = False
        self.sock = transport.async_socket(ctx, zmq.ROUTER)
        # the data plane: sent and received straight from the loop (`transport.LoopSocket`, no zmq.asyncio futures)
        self.io = transport.LoopSocket(self.sock, self._on_frames)
        self.ranks: list[RankInfo] = []
        self.agents: dict[int, AgentHandle] = {}
        self.generation = 0
        self.state = PoolState.WAITING
        self.store: Any = None
        self.ready_event = asyncio.Event()
        self.pending: dict[int, _Batch] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self.zap: curve.ZapHandler | None = None
        self._config_ok = False
        self.failure = ""
        self.joined_batches = 0
        self.cancelled_instances = 0
        # every report that failed the first start, in arrival order; the cause (a FAILED) can arrive after the
        # EXIT of a healthy rank its startup process stopped because of it
        self.start_failures: list[str] = []
        self.startups: set[bytes] = set()  # ZMQ identities of the Agent startup processes that asked for a config
        self._start_cause = asyncio.Event()

    async def start(self) -> None:
        address = self.cfg["distributed_address"]
        keys = curve.resolve(self.cfg.get("keys_dir"))
        curve.require_keys(address, keys, "The distributed worker", "distributed")
        if keys is not None:  # Agents must hold an authorized key: nothing else can register or take batches
            self.zap = curve.ZapHandler(self.sock.context, keys)  # type: ignore[arg-type]
            curve.secure_server(self.sock, keys)
            self._tasks.append(curve.watch_handshakes(self.sock, "the distributed worker"))
        try:
            self.sock.bind(transport.zmq_endpoint(address, "distributed"))
        except zmq.ZMQError as exc:
            raise StartupError(f"Distributed worker bind to {address} failed: {exc}") from None
        self.io.start()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        log.info("Distributed worker listening on %s for %d agents%s", address, self.dist.rank_size,
                 " (CurveZMQ: authorized keys only)" if keys is not None else "")
        path = self.cfg["rank_table_json_file"]
        self.ranks = parse_rank_table(path)
        check_against_declaration(self.ranks, path, self.dist.rank_size, self.dist.stage_size)
        import torch.distributed as dist

        host, port = transport.parse_address(address, "distributed")
        # the rendezvous every generation of the Agents' torch.distributed group goes through; on the Worker's own
        # address (a unix: address has only local Agents: loopback)
        self.store = _rendezvous_store(dist, host if port is not None else "127.0.0.1")
        self._config_ok = True

    async def wait_ready(self) -> None:
        wait_s = self.cfg["wait_agents_time_in_seconds"] or None
        try:
            await asyncio.wait_for(self.ready_event.wait(), wait_s)
        except asyncio.TimeoutError:
            raise StartupError(f"Failed to wait for ready of all agents, current agents count: {len(self.agents)}, "
                               f"rank size: {self.dist.rank_size}") from None
        if self.failure and self.state is not PoolState.READY:
            try:  # bounded: a startup process that died without a word still fails the start promptly
                await asyncio.wait_for(self._start_cause.wait(), START_CAUSE_GRACE_S)
            except asyncio.TimeoutError:
                pass
            reasons = sorted(dict.fromkeys(self.start_failures or [self.failure]),
                             key=lambda r: " failed" not in r)  # causes first
            raise StartupError(f"Failed to starting all agents, maybe some error reported: {'; '.join(reasons)}")

    # -- messages -------------------------------------------------------------------------------------------
    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        """One message from an Agent or a startup process (called by `LoopSocket` on the loop)."""
        identity = bytes(frames[0].buffer)
        try:
            kind, header, buffers = unpack([f.buffer for f in frames[1:]])
            self._on_message(identity, kind, header, buffers)
        except ServingError as exc:
            log.warning("bad message from %r: %s", identity, exc)
        except Exception:  # the control loop must never die
            log.exception("handling a message from %r failed", identity)

    def _send(self, identity: bytes, kind: Kind, header: dict[str, Any], buffers: Any = ()) -> None:
        """Send now (or queued in order behind what ZMQ could not take yet); never blocks. Loop thread only."""
        try:
            self.io.send(kind, header, buffers, to=identity)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that peer is gone; the heartbeat will notice
            log.debug("send to %r failed: %s", identity, exc)

    def _on_message(self, identity: bytes, kind: Kind, header: dict[str, Any], buffers: Any) -> None:
        rank = header.get("rank")
        agent = self.agents.get(rank) if isinstance(rank, int) else None
        if agent is not None and agent.identity == identity:
            agent.last_seen = time.monotonic()
        if kind is Kind.CONFIG:
            for lost in header.get("lost", []):  # a startup process is about to restart these ranks
                self._lost(lost.get("rank"), lost.get("pid"), str(lost.get("error", "")))
            self.startups.add(identity)  # told when the servable stops for good, see close()
            self._send(identity, Kind.CONFIG, {**self._agent_config(), "req": header.get("req")})
        elif kind is Kind.REGISTER:
            self._on_register(identity, header)
        elif kind is Kind.PING:
            self._send(identity, Kind.PONG, {})
        elif kind is Kind.RESULT:
            batch = self.pending.get(header.get("id", -1))
            if batch is not None:
                batch.on_reply(header, buffers)
        elif kind is Kind.STREAM:
            batch = self.pending.get(header.get("id", -1))
            if batch is not None:
                batch.on_stream(header, buffers)
        elif kind in (Kind.FAILED, Kind.EXIT):
            what = "failed" if kind is Kind.FAILED else "exited"
            who = f"Agent rank {rank}" if isinstance(rank, int) else "Agent startup process"
            detail = header.get("error", "")
            reason = f"{who} {what}{': ' + detail if detail else ''}"
            if not self.ever_ready:
                self.start_failures.append(reason)
                if kind is Kind.FAILED:
                    self._start_cause.set()
            if agent is not None and (agent.identity == identity or agent.pid == header.get("pid")):
                self._fail(reason)  # a member of the current group left (told by itself or by its supervisor)
            elif not self.ever_ready and kind is Kind.FAILED:
                self._fail(reason)  # a start failure fails the first start
            else:
                log.info("ignoring '%s' from a peer outside the current group", reason)

    def _lost(self, rank: object, pid: object, error: str) -> None:
        agent = self.agents.get(rank) if isinstance(rank, int) else None
        if agent is not None and agent.pid == pid:
            self._fail(f"Agent rank {rank} (pid {pid}) {error or 'was lost'}")

    def _agent_config(self) -> dict[str, Any]:
        """The CONFIG answer: ``{"config": AgentConfig}`` (validated here too: a bad value fails on this end,
        not in every startup process), or ``{"error": text}`` while the pool cannot give one yet."""
        if not self._config_ok:
            return {"error": "the distributed worker is not ready to give agent configs yet"}
        hb = self.heartbeat
        config = AgentConfig(
            servable=self.spec.name, rank_size=self.dist.rank_size, stage_size=self.dist.stage_size,
            shard=self.dist.shard, shard_options=dict(self.dist.shard_options or {}),
            with_batch_dim=self.model.with_batch_dim, ranks=[(r.ip, int(r.device_id)) for r in self.ranks],
            store_port=self.store.port, generation=self.generation,
            heartbeat=AgentHeartbeat(interval_s=hb["interval_s"], timeout_s=hb["timeout_s"],
                                     step_timeout_s=hb["step_timeout_s"]),
            group_timeout_s=hb["group_timeout_s"], continuous_batching=self.dist.continuous_batching,
            max_batch_rows=self.model.max_batch_size, max_batch_delay_ms=self.model.max_batch_delay_ms)
        return {"config": config.model_dump(mode="json")}

    def _on_register(self, identity: bytes, header: dict[str, Any]) -> None:
        rank, generation = header.get("rank"), header.get("generation")
        if not isinstance(rank, int) or not 0 <= rank < self.dist.rank_size:
            self._send(identity, Kind.EXIT, {"final": True, "error": "Invalid rank id"})
            return
        if generation != self.generation or self.state is PoolState.READY:
            # a late joiner of an old generation: it must leave and come back for the current one
            self._send(identity, Kind.EXIT, {"final": False, "error": "Distributed servable has ended up "
                                                                      "registration"})
            return
        self.agents[rank] = AgentHandle(rank, identity, int(header.get("pid", 0)))
        log.info("agent rank %d registered (pid %s, generation %d), %d/%d", rank, header.get("pid"),
                 self.generation, len(self.agents), self.dist.rank_size)
        if len(self.agents) == self.dist.rank_size:
            self.state = PoolState.READY
            self.failure = ""
            log.info("all %d agents ready (generation %d)", self.dist.rank_size, self.generation)
            self.ready_event.set()
            if self.ever_ready:
                self.on_recovered()
            self.ever_ready = True

    def _fail(self, reason: str) -> None:
        """An Agent is lost: fail in-flight batches, tell the others to leave, open the next generation."""
        if self.state is PoolState.STOPPED:
            return
        was_ready = self.state is PoolState.READY
        log.error("%s; the servable is unavailable until all agents re-join", reason)
        self.failure = reason
        error = Unavailable(f"servable is not available: {reason}")
        for batch in list(self.pending.values()):
            batch.fail(error)
        self.pending.clear()
        survivors = list(self.agents.values())
        self.agents.clear()
        self.generation += 1
        self.state = PoolState.WAITING
        self.ready_event.clear()
        for agent in survivors:
            self._send(agent.identity, Kind.EXIT, {"final": False, "error": reason})
        if was_ready:
            self.on_failure(reason)
        elif not self.ever_ready:
            self.ready_event.set()  # wake wait_ready: a failure during the first start fails the start

    async def _heartbeat_loop(self) -> None:
        interval, timeout = self.heartbeat["interval_s"], self.heartbeat["timeout_s"]
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for agent in list(self.agents.values()):
                if now - agent.last_seen > timeout:
                    self._fail(f"Agent rank {agent.rank} (pid {agent.pid}) missed heartbeats for {timeout:.1f} s")
                    break
                self._send(agent.identity, Kind.PING, {})

    # -- data plane -----------------------------------------------------------------------------------------
    async def predict(self, instances: list[list[Value]],
                      on_result: Callable[[int, list[Value]], None] | None = None,
                      cancels: list[CancelToken | None] | None = None,
                      pieces: list[PieceSink | None] | None = None) -> list[list[Value] | ServingError]:
        """Run one batch on every rank. ``on_result(i, outputs)`` is called as soon as the output rank
        reports instance i complete (before the whole batch is), when the shard emits early results.
        Cancelling ``cancels[i]`` tells the output rank to stop instance i (a shard that decodes step by step
        finishes it at the next step; its output is then partial and nobody reads it). ``pieces[i]``, when
        given, receives what the shard streams for instance i (`BatchLink.stream`); the Agents are told which
        instances stream, and send nothing for the others."""
        if self.state is not PoolState.READY:
            raise Unavailable(f"servable is not available: {self.failure or 'agents are not ready'}")
        batch_id = next(self._ids)
        batch = _Batch(self.dist.rank_size, len(instances), on_result, pieces)
        self.pending[batch_id] = batch
        buffers: list[Any] = []
        encoded = [[encode_value(v, buffers) for v in inst] for inst in instances]
        tp = self.dist.tp_size
        extra: dict[str, Any] = {}
        if pieces is not None and any(p is not None for p in pieces):
            extra["stream"] = [i for i, p in enumerate(pieces) if p is not None]
        try:
            for rank in range(self.dist.rank_size):
                agent = self.agents[rank]
                if rank < tp:  # stage 0 gets the inputs; later stages get them from upstream
                    self._send(agent.identity, Kind.PREDICT, {"id": batch_id, "instances": encoded, **extra},
                               buffers)
                else:
                    self._send(agent.identity, Kind.PREDICT, {"id": batch_id, "count": len(instances), **extra})
            loop = asyncio.get_running_loop()
            for index, token in enumerate(cancels or []):
                if token is not None:
                    token.on_cancel(partial(loop.call_soon_threadsafe, self._cancel_row, batch_id, index))
            try:
                return await batch.future
            finally:
                self.joined_batches += batch.joined
                self.cancelled_instances += batch.cancelled
        finally:
            self.pending.pop(batch_id, None)

    def _cancel_row(self, batch_id: int, index: int) -> None:
        if batch_id in self.pending:  # still running: only the output rank decides when rows finish
            output = self.agents.get(self.dist.output_rank)
            if output is not None:
                self._send(output.identity, Kind.CANCEL, {"id": batch_id, "rows": [index]})

    async def close(self) -> None:
        """Tell every Agent, and every Agent startup process, that the servable is going away for good: a
        startup process whose Agents are between generations stops instead of waiting to re-join."""
        self.state = PoolState.STOPPED
        for identity in [a.identity for a in self.agents.values()] + list(self.startups):
            self._send(identity, Kind.EXIT, {"final": True})
        await self.io.drain(0.5)  # the EXITs must leave before the socket closes
        self.io.stop()
        for task in self._tasks:
            task.cancel()
        if self.zap is not None:
            self.zap.close()
        self.sock.close(linger=500)


def _rendezvous_store(dist: Any, host: str) -> Any:
    """The master TCPStore of the Agents' rendezvous, listening on ``host`` (the Distributed Worker's configured
    address; a wildcard means every interface, as configured) and an ephemeral port. torch's TCPStore listens on
    every interface whatever host it is given, so the socket is bound here and handed over."""
    wildcard = host in ("0.0.0.0", "*")
    bind_host = "0.0.0.0" if wildcard else host
    try:
        family, kind, _, _, sockaddr = socket.getaddrinfo(bind_host, 0, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind)
        try:
            listener.bind(sockaddr)
            listener.listen(1024)
            port = int(listener.getsockname()[1])
            fd = listener.detach()  # owned by the store from here on
        finally:
            listener.close()
    except OSError as exc:
        raise StartupError(f"Distributed worker failed to listen for the agents' rendezvous on {bind_host}: "
                           f"{exc}") from None
    try:  # the store's own client connects to it too: a wildcard is reached on loopback
        return dist.TCPStore("127.0.0.1" if wildcard else bind_host, port, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=60), master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


class _Batch:
    """Collects the replies of every rank for one batch; the output rank's carries the outputs."""

    def __init__(self, rank_size: int, count: int,
                 on_result: Callable[[int, list[Value]], None] | None = None,
                 pieces: list[PieceSink | None] | None = None) -> None:
        self.on_result = on_result
        self.pieces = pieces
        self.waiting = set(range(rank_size))
        self.count = count
        self.outputs: list[list[Value] | ServingError] | None = None
        self.error: ServingError | None = None
        self.joined = False  # the Agents ran it inside an earlier batch (continuous batching)
        self.cancelled = 0  # instances the output rank stopped early because their caller gave up
        self.future: asyncio.Future[list[list[Value] | ServingError]] = asyncio.get_running_loop().create_future()

    def on_reply(self, header: dict[str, Any], buffers: Any) -> None:
        if "partial" in header:  # one finished instance, ahead of the batch
            index = header["partial"]
            if self.on_result is not None and isinstance(index, int) and 0 <= index < self.count:
                try:
                    self.on_result(index, [decode_value(v, buffers) for v in header.get("ok", [])])
                except ServingError:
                    pass  # the final reply carries it again
            return
        rank = header.get("rank")
        self.waiting.discard(rank)
        self.joined = self.joined or bool(header.get("joined"))
        if isinstance(header.get("cancelled"), int):
            self.cancelled += header["cancelled"]
        if "error" in header and self.error is None:
            self.error = ServingError.from_wire(header["error"])
            self.error.message = f"Error happened on get result of rank {rank}: {self.error.message}"
        if "results" in header:
            try:
                self.outputs = [ServingError.from_wire(r["error"]) if "error" in r else
                                [decode_value(v, buffers) for v in r["ok"]] for r in header["results"]]
            except ServingError as exc:
                self.error = exc
        if not self.waiting and not self.future.done():
            if self.error is not None:
                self.future.set_exception(self.error)
            elif self.outputs is None or len(self.outputs) != self.count:
                self.future.set_exception(ServingError("the output rank returned no result for the batch"))
            else:
                self.future.set_result(self.outputs)

    def on_stream(self, header: dict[str, Any], buffers: Any) -> None:
        """``{"pieces": [[index, [value, ...], finish], ...]}`` from the output rank: hand each to its sink."""
        for item in header.get("pieces", []):
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], int)
                    and 0 <= item[0] < self.count and self.pieces is not None and isinstance(item[1], list)):
                continue
            sink = self.pieces[item[0]]
            if sink is None:
                continue
            try:
                outputs = [decode_value(v, buffers) for v in item[1]]
            except ServingError as exc:
                log.warning("dropping an undecodable stream piece: %s", exc)
                continue
            sink.piece(outputs, item[2] if isinstance(item[2], str) else None)

    def fail(self, error: ServingError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class DistributedBackend:
    """`Backend` for the batcher: hands a batch to the pool on the Worker's loop and waits for it."""

    def __init__(self, pool: AgentPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.batch_size = pool.model.max_batch_size

    @property
    def joined(self) -> int:
        return self.pool.joined_batches

    @property
    def cancelled(self) -> int:
        return self.pool.cancelled_instances

    def check_instance(self, values: list[Value]) -> list[Value]:
        return values

    def run(self, instances: list[list[Value]]) -> list[list[Value] | ServingError]:
        return self.run_streaming(instances, None, [])

    def run_streaming(self, instances: list[list[Value]], on_result: Callable[[int, list[Value]], None] | None,
                      cancels: list[CancelToken | None],
                      pieces: list[PieceSink | None] | None = None) -> list[list[Value] | ServingError]:
        fut: Future[list[list[Value] | ServingError]] = asyncio.run_coroutine_threadsafe(
            self.pool.predict(instances, on_result, cancels, pieces), self.loop)
        return fut.result()
