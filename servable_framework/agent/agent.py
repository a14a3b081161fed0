"""One Agent: one rank of a distributed servable, holding one model shard.

Start-up: connect to the Distributed Worker, join generation ``g`` of the torch.distributed group through
the Worker's TCPStore (gloo on CPU, nccl on CUDA), create one TP group per stage, load the shard, REGISTER,
and tell the startup process "ready" over the status pipe. Then: PREDICT messages run on one compute
thread in arrival order (every rank sees the same order, so collectives line up); the asyncio loop keeps
answering heartbeats meanwhile.

Exit codes tell the startup process what to do: 0 = the servable is gone for good (do not restart);
`EXIT_REJOIN` = the group broke or the Worker vanished, start again for the next generation; 1 = failure.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import zmq
import zmq.asyncio

from servable_framework import crypto, curve, netif, procs, transport
from servable_framework.agent.config import AgentConfig, AgentPayload
from servable_framework.agent.shard import InStepError, ModelShard, ShardContext, WaitingBatch, find_shard
from servable_framework.errors import InvalidInput, ServingError
from servable_framework.logs import setup_logging
from servable_framework.wire import Kind, decode_value, encode_value, unpack

log = logging.getLogger("servable_framework.agent")

EXIT_REJOIN = 3
LEAVE_GRACE_S = 1.0  # `Agent._leave_group`: how long a failed rank waits for news of a dead peer first
JOIN_WAIT_S = 30.0  # a batch the output rank saw must reach every rank within this (it was sent to all at once)
_SENT = object()  # `_run`: the batch's reply already left (it was completed or taken in by a running batch)


def _error_wire(error: Exception, rank: int) -> dict[str, Any]:
    """Bad input (``ValueError``: the shard refused the instances) is the client's fault (HTTP 400) and keeps its
    text, a `ServingError` keeps its kind; anything else is named with its type and the rank it happened on."""
    if isinstance(error, ServingError):
        return error.to_wire()
    if isinstance(error, ValueError):
        return InvalidInput(str(error)).to_wire()
    return ServingError(f"rank {rank}: {type(error).__name__}: {error}").to_wire()


def _out_of_step(error: Exception) -> bool:
    """Whether ``error`` may have left this rank's collectives out of step with its peers' (anything but bad
    input and failures every rank took alike)."""
    return not isinstance(error, (ServingError, ValueError, InStepError))


class Inbox:
    """Batches that reached this rank and have not started, in arrival order. The Worker sends every batch
    to every rank over one ordered connection each, so the order is the same on every rank."""

    def __init__(self) -> None:
        self._items: collections.deque[WaitingBatch] = collections.deque()
        self._cond = threading.Condition()

    def put(self, batch: WaitingBatch) -> None:
        with self._cond:
            self._items.append(batch)
            self._cond.notify_all()

    def take_id(self, batch_id: Any) -> WaitingBatch | None:
        """Remove and return the batch, or None when a running batch already took it in."""
        with self._cond:
            for item in self._items:
                if item.batch_id == batch_id:
                    self._items.remove(item)
                    return item
        return None

    def fitting(self, free_rows: int) -> tuple[int, int, bool, float]:
        """How many batches from the front fit, together, in ``free_rows``: (batches, their rows, whether
        the next one is left out for lack of rows, arrival time of the first)."""
        k = rows = 0
        with self._cond:
            for item in self._items:
                if rows + item.count > free_rows:
                    return k, rows, True, self._items[0].arrived
                rows += item.count
                k += 1
            return k, rows, False, self._items[0].arrived if self._items else 0.0

    def take(self, k: int, timeout_s: float) -> list[WaitingBatch]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) >= k, timeout_s):
                raise RuntimeError(f"{k} batches to join did not reach this rank within {timeout_s:.0f} s")
            return [self._items.popleft() for _ in range(k)]


class _Link:
    """`BatchLink` of one ``predict`` call: early answers, replies of batches taken in, the inbox."""

    def __init__(self, agent: Agent, batch_id: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.agent, self.batch_id, self.loop = agent, batch_id, loop
        self.max_rows = agent.cfg.max_batch_rows if agent.cfg.continuous_batching else 0
        self.join_delay_s = agent.cfg.max_batch_delay_ms / 1000.0
        self.open: list[Any] = []  # joined batches not yet completed
        self.done: set[Any] = set()

    def _send(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def emit(self, batch_id: Any, index: int, outputs: list[Any]) -> None:
        buffers: list[Any] = []
        header = {"id": batch_id, "rank": self.agent.rank, "partial": index,
                  "ok": [encode_value(v, buffers) for v in outputs]}
        self.loop.call_soon_threadsafe(self.agent.io.send, Kind.RESULT, header, buffers)

    def complete(self, batch_id: Any, outputs: list[Any] | None) -> None:
        self._finish(batch_id)
        self._send(self.agent._reply(batch_id, outputs, None, joined=batch_id != self.batch_id))

    def fail(self, batch_id: Any, error: Exception) -> None:
        self._finish(batch_id)
        self._send(self.agent._reply(batch_id, None, error, joined=batch_id != self.batch_id))

    def _finish(self, batch_id: Any) -> None:
        self.done.add(batch_id)
        if batch_id in self.open:
            self.open.remove(batch_id)

    def joinable(self, active_rows: int) -> int:
        """Waiting batches join like the Worker batches requests: at once when nothing else runs or they fill
        the free rows, else once the oldest has waited ``max_batch_delay_ms``. Each join costs a prefill pass
        beside the decode step, so gathering a few joiners into one pass pays while rows keep decoding."""
        if self.max_rows <= 0:
            return 0
        free = self.max_rows - active_rows
        k, rows, more, arrived = self.agent.inbox.fitting(free)
        if k and (active_rows == 0 or rows == free or more or time.monotonic() - arrived >= self.join_delay_s):
            return k
        return 0

    def cancelled(self) -> set[tuple[Any, int]]:
        out: set[tuple[Any, int]] = set()
        for batch_id in [self.batch_id, *self.open]:
            out.update((batch_id, i) for i in set(self.agent.cancelled.get(batch_id, ())))
        return out

    def stopped(self, batch_id: Any, index: int) -> None:
        self.agent.stopped[batch_id] = self.agent.stopped.get(batch_id, 0) + 1
        log.info("rank %d: instance %d of batch %s stopped early: its caller gave up", self.agent.rank, index,
                 batch_id)

    def progress(self) -> None:
        self.agent.last_step = time.monotonic()

    def stream(self, pieces: list[tuple[Any, int, list[Any], str | None]]) -> None:
        """`BatchLink.stream`: one STREAM message per batch, only for the rows whose request streams (the
        Worker names them in PREDICT's ``stream``); a piece with nothing new and no finish is not sent."""
        by_batch: dict[Any, list[tuple[int, list[Any], str | None]]] = {}
        for batch_id, index, outputs, finish in pieces:
            if index in self.agent.streaming.get(batch_id, ()) and (finish is not None or not _empty(outputs)):
                by_batch.setdefault(batch_id, []).append((index, outputs, finish))
        for batch_id, rows in by_batch.items():
            buffers: list[Any] = []
            header = {"id": batch_id, "rank": self.agent.rank,
                      "pieces": [[index, [encode_value(v, buffers) for v in outputs], finish]
                                 for index, outputs, finish in rows]}
            self.loop.call_soon_threadsafe(self.agent.io.send, Kind.STREAM, header, buffers)

    def join(self, k: int) -> list[WaitingBatch]:
        if k <= 0:
            return []
        batches = self.agent.inbox.take(k, JOIN_WAIT_S)
        self.open.extend(b.batch_id for b in batches)
        log.debug("rank %d: batches %s join batch %s", self.agent.rank, [b.batch_id for b in batches],
                  self.batch_id)
        return batches


def _empty(outputs: list[Any]) -> bool:
    """A step's outputs with nothing new in them (every value has length 0)."""
    return all((isinstance(v, (str, bytes)) or getattr(v, "ndim", 0) > 0) and len(v) == 0 for v in outputs)


def bind_collectives(host: str) -> str:
    """Make gloo and NCCL listen on the interface that holds ``host``, this rank's rank table address, and return
    that interface. Both pick an interface from the hostname by default: on a host with several networks, or in
    a network namespace, that is not where the peers on other hosts look for this rank (gloo even falls back to
    loopback). A variable the user set (``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``) is kept.

    Raises:
        RuntimeError: no interface of this machine holds ``host`` (the message names it and the machine's
            addresses).
    """
    iface = netif.interface_of(host)
    if iface is None:
        raise RuntimeError(netif.not_local_message(host, "Rank table host"))
    # gloo matches the name exactly; NCCL matches a prefix unless the name starts with "="
    for var, value in (("GLOO_SOCKET_IFNAME", iface), ("NCCL_SOCKET_IFNAME", f"={iface}")):
        if os.environ.get(var):
            log.info("%s=%s is set; it is kept (the rank table address %s is on %s)", var, os.environ[var], host,
                     iface)
        else:
            os.environ[var] = value  # read by torch when each process group is created
    return iface


def init_distributed(cfg: AgentConfig, rank: int, device_id: int,
                     store_host: str) -> tuple[Any, Any, Any, Any, Any]:
    """Join the group of this generation; returns (device, tp_group, cpu_group, tp_comm, host_comm). On CUDA the
    default group is nccl (tensors) and ``cpu_group`` a gloo group of every rank (host-side metadata); on CPU the
    default group is gloo and ``cpu_group`` None. ``tp_comm`` is a `collectives.HostComm` (shared memory) when this
    rank's TP group runs on CPU and all on this rank's rank table address, else None (``ShardContext.tp_comm``
    then uses torch.distributed on ``tp_group``); ``host_comm`` one of every rank for host-side tensors when the
    whole rank table is on this host (else None).

    The rendezvous is the Distributed Worker's TCPStore at ``store_host`` (the host this Agent reaches the
    Worker at); the collectives listen on this rank's own rank table address (`bind_collectives`).
    """
    import torch
    import torch.distributed as dist

    from servable_framework.engine import collectives

    host = cfg.ranks[rank][0]
    iface = bind_collectives(host)
    log.info("rank %d: collectives on %s (interface %s), rendezvous at %s:%s", rank, host, iface, store_host,
             cfg.store_port)
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", device_id) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.group_timeout_s)
    store = dist.TCPStore(store_host, cfg.store_port, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"gen{cfg.generation}/", store)
    dist.init_process_group("nccl" if use_cuda else "gloo", store=prefixed, rank=rank,
                            world_size=cfg.rank_size, timeout=timeout)
    # every rank creates every group, in the same order
    cpu_group = dist.new_group(backend="gloo") if use_cuda else None
    tp = cfg.rank_size // cfg.stage_size
    tp_group = None
    for stage in range(cfg.stage_size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(stage * tp, (stage + 1) * tp))) if tp > 1 else None
        if rank // tp == stage:
            tp_group = group
    tp_comm = None
    stage = rank // tp
    if tp > 1 and collectives.host_comm_supported(device) and \
            len({cfg.ranks[r][0] for r in range(stage * tp, (stage + 1) * tp)}) == 1:
        assert tp_group is not None
        tp_comm = collectives.HostComm.connect(prefixed, f"tp-comm/stage{stage}", tp_group, tp, rank % tp,
                                               cfg.group_timeout_s)
        log.info("rank %d: tensor-parallel collectives of stage %d through shared memory (all %d ranks on %s)",
                 rank, stage, tp, host)
    host_comm = None
    if cfg.rank_size > 1 and collectives.host_comm_supported(torch.device("cpu")) and \
            len({h for h, _ in cfg.ranks}) == 1:  # host-side metadata (the per-step plan) of every rank
        host_comm = collectives.HostComm.connect(prefixed, "host-comm/world", cpu_group, cfg.rank_size, rank,
                                                 cfg.group_timeout_s)
    return device, tp_group, cpu_group, tp_comm, host_comm


class Agent:
    def __init__(self, payload: AgentPayload) -> None:
        self.payload = payload
        self.cfg = payload.config
        self.rank = payload.rank
        self.ctx = zmq.asyncio.Context()
        self.sock = transport.async_socket(self.ctx, zmq.DEALER,
                                           identity=f"agent-{self.rank}-{os.getpid()}".encode())
        keys = curve.resolve(payload.keys_dir)
        if keys is not None:  # the startup process checked that keys exist where the Worker requires them
            curve.secure_client(self.sock, keys)
        self.sock.connect(transport.zmq_endpoint(payload.distributed_address, "distributed"))
        # sent and received straight from the loop (`transport.LoopSocket`, no zmq.asyncio futures per message)
        self.io = transport.LoopSocket(self.sock, self._on_frames)
        self.io.start()
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.inbox = Inbox()
        # batch id -> instances Main gave up on (output rank only; set on the loop, read by the compute thread)
        self.cancelled: dict[Any, set[int]] = {}
        self.stopped: dict[Any, int] = {}  # batch id -> instances the shard stopped early because of it
        self.streaming: dict[Any, set[int]] = {}  # batch id -> its rows whose request streams (`_Link.stream`)
        self.live: set[Any] = set()  # batches that reached this rank and are not answered yet
        self.shard: ModelShard | None = None
        self.last_ping = time.monotonic()
        self.running: Any = None  # id of the batch on the compute thread (None: idle)
        self.last_step = time.monotonic()  # when the running batch started or last completed a step
        self.exit_code: int | None = None
        self.done = asyncio.Event()

    def finish(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
        self.done.set()

    def load(self) -> None:
        import torch

        threads = self.payload.threads  # the startup process's `Settings.agent_thread_count`
        torch.set_num_threads(threads)
        try:  # one compute thread and no inter-op parallel work: no idle inter-op pool
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only possible before the first inter-op parallel work; keep the default then
            pass
        log.info("rank %d uses %d torch threads", self.rank, threads)
        host, _ = transport.parse_address(self.payload.distributed_address, "distributed")
        t0 = time.perf_counter()
        device, tp_group, cpu_group, tp_comm, host_comm = init_distributed(
            self.cfg, self.rank, self.payload.device_id, "127.0.0.1" if host in ("0.0.0.0", "*") else host)
        log.info("rank %d joined the %s group (generation %d) in %.2f s", self.rank,
                 "nccl" if device.type == "cuda" else "gloo", self.cfg.generation, time.perf_counter() - t0)
        ctx = ShardContext(rank=self.rank, rank_size=self.cfg.rank_size,
                           stage_size=self.cfg.stage_size, model_files=self.payload.model_files,
                           device=device, tp_group=tp_group, cpu_group=cpu_group,
                           options=dict(self.cfg.shard_options), comm=tp_comm, host_comm=host_comm)
        t0 = time.perf_counter()
        log.info("rank %d loading shard '%s' (stage %d, tp rank %d/%d) from %s", self.rank, self.cfg.shard,
                 ctx.stage, ctx.tp_rank, ctx.tp_size, ctx.model_files)
        self.shard = find_shard(self.cfg.shard)(ctx)
        log.info("rank %d shard loaded in %.2f s", self.rank, time.perf_counter() - t0)

    async def run(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.compute, self.load)
        self.io.send(Kind.REGISTER, {"rank": self.rank, "pid": os.getpid(), "generation": self.cfg.generation})
        procs_status(self.payload, b"R")
        self.last_ping = time.monotonic()
        watch = asyncio.create_task(self._watch_worker())
        await self.done.wait()
        watch.cancel()

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        """One message from the Distributed Worker (called by `LoopSocket` on the loop; must not block)."""
        try:
            kind, header, buffers = unpack([f.buffer for f in frames])
        except ServingError as exc:
            log.warning("dropping a malformed message: %s", exc)
            return
        self.last_ping = time.monotonic()
        if kind is Kind.PING:
            if self.shard is not None:  # PONG only once loaded and registered, as before
                self.io.send(Kind.PONG, {"rank": self.rank})
        elif kind is Kind.PREDICT:
            transport.spawn(self._predict(header, buffers, frames))
        elif kind is Kind.CANCEL:
            # a task, like PREDICT: it then runs after the batch it names was queued (tasks start in order)
            transport.spawn(self._cancel(header))
        elif kind is Kind.EXIT:
            final = bool(header.get("final", True))
            log.info("rank %d told to exit (%s)%s", self.rank, "servable stopped" if final else "re-join",
                     f": {header['error']}" if header.get("error") else "")
            self.finish(0 if final else EXIT_REJOIN)

    async def _cancel(self, header: dict[str, Any]) -> None:
        batch_id, rows = header.get("id"), header.get("rows")
        if batch_id in self.live and isinstance(rows, list):
            self.cancelled.setdefault(batch_id, set()).update(r for r in rows if isinstance(r, int))

    async def _predict(self, header: dict[str, Any], buffers: Any, frames: Any) -> None:
        loop = asyncio.get_running_loop()
        batch_id = cast(int, header.get("id"))  # the Worker sends every PREDICT with its batch's int id
        self.live.add(batch_id)
        if isinstance(header.get("stream"), list):
            self.streaming[batch_id] = {r for r in header["stream"] if isinstance(r, int)}
        raw = header.get("instances")
        count = len(raw) if isinstance(raw, list) else int(header.get("count", 0))
        try:
            instances = None if raw is None else [[decode_value(v, buffers) for v in inst] for inst in raw]
        except (ServingError, ValueError, TypeError) as exc:
            # still queued like every other rank queues it, so all ranks stay in step: the shard rejects a
            # stage-0 batch without instances before any collective and tells the later stages
            log.warning("rank %d: undecodable instances in batch %s: %s", self.rank, batch_id, exc)
            instances = None
        assert self.shard is not None
        # waits here (same order on every rank) until its own turn, unless a running batch takes it in first
        self.inbox.put(WaitingBatch(batch_id, instances, count))
        try:
            outputs = await loop.run_in_executor(self.compute, self._run, batch_id, loop)
        except Exception as exc:
            if not isinstance(exc, (ServingError, ValueError)):
                log.exception("rank %d failed on a batch", self.rank)
            await self._reply(batch_id, None, exc)
        else:
            if outputs is not _SENT:
                await self._reply(batch_id, outputs, None)
        del frames  # inputs were zero-copy views of these frames

    async def _reply(self, batch_id: Any, outputs: list[Any] | None, error: Exception | None,
                     joined: bool = False) -> None:
        reply: dict[str, Any] = {"id": batch_id, "rank": self.rank}
        self.live.discard(batch_id)
        self.cancelled.pop(batch_id, None)
        self.streaming.pop(batch_id, None)
        stopped = self.stopped.pop(batch_id, 0)
        if stopped:
            reply["cancelled"] = stopped
        if joined:
            reply["joined"] = True
        buffers: list[Any] = []
        if error is not None:
            reply["error"] = _error_wire(error, self.rank)
        elif outputs is not None:
            reply["results"] = [{"ok": [encode_value(v, buffers) for v in out]} for out in outputs]
        self.io.send(Kind.RESULT, reply, buffers)

    def _run(self, batch_id: Any, loop: asyncio.AbstractEventLoop) -> Any:
        """On the compute thread: run the batch, unless a batch that ran before took it in (then it is done)."""
        assert self.shard is not None
        waiting = self.inbox.take_id(batch_id)
        if waiting is None:
            return _SENT
        link = _Link(self, batch_id, loop)
        self.shard.link = link
        self.running, self.last_step = batch_id, time.monotonic()
        try:
            outputs = self.shard.predict(waiting.instances)
        except Exception as exc:
            if _out_of_step(exc):
                # no replies from here: the Worker fails every batch in flight, with the cause, when this rank
                # leaves the group (or sooner, when it learns that a peer died and broke this rank's collectives)
                log.exception("rank %d failed mid-batch %s", self.rank, batch_id)
                reason = f"rank {self.rank} failed mid-batch ({type(exc).__name__}: {exc}); the group re-forms"
                asyncio.run_coroutine_threadsafe(self._leave_group(reason), loop)
                return _SENT
            for joined in list(link.open):  # batches taken in fail with the one that carried them
                link.fail(joined, exc)
            if batch_id in link.done:  # its own reply already left; the failure was logged by the joined ones
                log.error("rank %d: a batch failed after batch %s completed: %s", self.rank, batch_id, exc)
                return _SENT
            raise  # bad input or an in-step failure: `_predict` answers it, the group stays as it is
        finally:
            self.shard.link = None
            self.running = None
        return _SENT if batch_id in link.done else outputs

    async def _leave_group(self, reason: str) -> None:
        """This rank cannot go on in step with its peers: tell the Worker (it fails the batches in flight with
        ``reason``, which names this rank, and tells every rank to re-join), then exit to be restarted for the
        next generation. A peer that died also breaks this rank's collectives; its death is usually reported
        within moments (by its startup process), so this rank first waits `LEAVE_GRACE_S` for the Worker's
        EXIT, so that clients are told the real cause rather than this rank's broken connection."""
        if self.exit_code is not None:
            return
        try:
            await asyncio.wait_for(self.done.wait(), LEAVE_GRACE_S)
            return  # the Worker already re-forms the group
        except asyncio.TimeoutError:
            pass
        log.error("%s", reason)
        if self.shard is not None:  # peers waiting in a shared-memory collective fail now, not at a timeout
            for comm in (self.shard.ctx.comm, self.shard.ctx.host_comm):
                if comm is not None:
                    comm.abort()
        self._tell(Kind.FAILED, {"rank": self.rank, "pid": os.getpid(), "error": reason})
        await self.io.drain(0.5)
        self.finish(EXIT_REJOIN)

    def _tell(self, kind: Kind, header: dict[str, Any]) -> None:
        """A last notice to the Worker (FAILED, EXIT): queued if ZMQ cannot take it now; lost if it never can."""
        try:
            self.io.send(kind, header)
        except zmq.ZMQError as exc:
            log.warning("could not tell the distributed worker (%s): %s", kind.name, exc)

    async def _watch_worker(self) -> None:
        hb = self.cfg.heartbeat
        while True:
            await asyncio.sleep(hb.interval_s)
            now = time.monotonic()
            if now - self.last_ping > hb.timeout_s:
                log.error("rank %d: no heartbeat from the distributed worker for %.1f s", self.rank, hb.timeout_s)
                self.finish(EXIT_REJOIN)
                return
            step_timeout = hb.step_timeout_s
            if self.running is not None and now - self.last_step > step_timeout:
                await self._leave_group(f"rank {self.rank}: batch {self.running} made no step for {step_timeout:.0f} s "
                                        f"(a peer rank hung or died inside a collective); the group re-forms")
                return

    async def close(self) -> None:
        if self.exit_code == 1:  # leaving on our own (signal, parent gone): tell the worker at once
            self._tell(Kind.EXIT, {"rank": self.rank})
        await self.io.drain(0.5)
        self.io.stop()
        self.sock.close(linger=200)
        # deliver what is still queued (a FAILED or EXIT just sent) before the process exits: os._exit follows,
        # which would drop it; term() waits for the socket's linger at most
        self.ctx.term()


def procs_status(payload: AgentPayload, status: bytes) -> None:
    """Tell the startup process how the start went (b"R" ready, b"F<text>" failed) over the status pipe."""
    try:
        os.write(payload.status_fd, status[:4096] + b"\n")
    except OSError:
        pass


async def _amain(payload: AgentPayload) -> int:
    agent = Agent(payload)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.finish, 1)
    procs.watch_parent(lambda: loop.call_soon_threadsafe(agent.finish, 1))
    run = asyncio.create_task(agent.run())
    done = asyncio.create_task(agent.done.wait())
    await asyncio.wait({run, done}, return_when=asyncio.FIRST_COMPLETED)
    if run.done() and run.exception() is not None:
        exc = run.exception()
        log.error("rank %d failed to start: %s", payload.rank, "".join(traceback.format_exception(exc)))
        text = f"rank {payload.rank}: {type(exc).__name__}: {exc}"
        procs_status(payload, b"F" + text.encode(errors="replace"))
        agent._tell(Kind.FAILED, {"rank": payload.rank, "error": text})
        await agent.io.drain(0.5)
        agent.io.stop()
        agent.sock.close(linger=500)
        agent.ctx.term()
        return 1
    run.cancel()
    await agent.close()
    return agent.exit_code or 0


WARM_SHARD_ENV = "SERVABLE_AGENT_WARM_SHARD"


def _warm_up(shard: str) -> None:
    """A standby Agent (see `procs.spawn`): import torch and the shard's module while nobody waits for it."""
    import torch.distributed  # noqa: F401 - imported for its side effect: the import cost is paid now

    try:
        find_shard(shard)
    except Exception:  # the real start reports it, with the rank's context
        pass


def agent_main() -> None:
    warm = os.environ.get(WARM_SHARD_ENV)
    if warm is not None:
        _warm_up(warm)
    raw = procs.read_payload()
    if raw is None:  # a standby whose startup process ended without needing it
        procs.exit_now(0)
        return
    key = raw.pop(crypto.PAYLOAD_FIELD, None)  # came through a pipe, never the environment
    if key:
        crypto.set_process_key(crypto.ModelKey.from_payload(key))
    payload = AgentPayload.model_validate(raw)  # a mismatch is a bug between two files of one install: fail loudly
    setup_logging(f"agent{payload.rank}")
    os.environ.update({"RANK_ID": str(payload.rank), "DEVICE_ID": str(payload.device_id)})
    if sys.version_info >= (3, 11):
        # uvloop, as Main's and the Worker's: MatMul over 2 Agents, CPU per request of each Agent 1,355-1,700 us
        # on asyncio's own loop vs 812-1,226 us (A/B runs interleaved, wrk c=8)
        with asyncio.Runner(loop_factory=transport.new_event_loop) as runner:
            code = runner.run(_amain(payload))
    else:  # pragma: no cover
        code = asyncio.run(_amain(payload))
    # skip interpreter teardown: a process group with a dead peer can hang in destructors
    procs.exit_now(code)
