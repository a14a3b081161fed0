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
import datetime
import logging
import os
import signal
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq
import zmq.asyncio

from servable_framework import procs, transport
from servable_framework.agent.shard import ModelShard, ShardContext, find_shard
from servable_framework.errors import ServingError
from servable_framework.logs import setup_logging
from servable_framework.wire import Kind, decode_value, encode_value, unpack

log = logging.getLogger("servable_framework.agent")

EXIT_REJOIN = 3


def init_distributed(cfg: dict[str, Any], rank: int, device_id: int, store_host: str) -> tuple[Any, Any]:
    """Join the group of this generation; returns (device, tp_group)."""
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", device_id) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(cfg.get("group_timeout_s", 120)))
    store = dist.TCPStore(store_host, int(cfg["store_port"]), is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"gen{cfg['generation']}/", store)
    dist.init_process_group("nccl" if use_cuda else "gloo", store=prefixed, rank=rank,
                            world_size=int(cfg["rank_size"]), timeout=timeout)
    tp = int(cfg["rank_size"]) // int(cfg["stage_size"])
    tp_group = None
    for stage in range(int(cfg["stage_size"])):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(stage * tp, (stage + 1) * tp))) if tp > 1 else None
        if rank // tp == stage:
            tp_group = group
    return device, tp_group


class Agent:
    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        self.cfg: dict[str, Any] = payload["config"]
        self.rank: int = payload["rank"]
        self.ctx = zmq.asyncio.Context()
        self.sock = transport.async_socket(self.ctx, zmq.DEALER,
                                           identity=f"agent-{self.rank}-{os.getpid()}".encode())
        self.sock.connect(transport.zmq_endpoint(payload["distributed_address"], "distributed"))
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.shard: ModelShard | None = None
        self.last_ping = time.monotonic()
        self.exit_code: int | None = None
        self.done = asyncio.Event()

    def finish(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
        self.done.set()

    def load(self) -> None:
        import torch

        torch.set_num_threads(int(os.environ.get("SERVABLE_AGENT_THREADS", "1")))
        host, _ = transport.parse_address(self.payload["distributed_address"], "distributed")
        t0 = time.perf_counter()
        device, tp_group = init_distributed(self.cfg, self.rank, self.payload["device_id"],
                                            "127.0.0.1" if host in ("0.0.0.0", "*") else host)
        log.info("rank %d joined the %s group (generation %d) in %.2f s", self.rank,
                 "nccl" if device.type == "cuda" else "gloo", self.cfg["generation"], time.perf_counter() - t0)
        ctx = ShardContext(rank=self.rank, rank_size=int(self.cfg["rank_size"]),
                           stage_size=int(self.cfg["stage_size"]), model_files=self.payload["model_files"],
                           device=device, tp_group=tp_group, options=dict(self.cfg.get("shard_options") or {}))
        t0 = time.perf_counter()
        log.info("rank %d loading shard '%s' (stage %d, tp rank %d/%d) from %s", self.rank, self.cfg["shard"],
                 ctx.stage, ctx.tp_rank, ctx.tp_size, ctx.model_files)
        self.shard = find_shard(self.cfg["shard"])(ctx)
        log.info("rank %d shard loaded in %.2f s", self.rank, time.perf_counter() - t0)

    async def run(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.compute, self.load)
        await transport.send(self.sock, Kind.REGISTER, {"rank": self.rank, "pid": os.getpid(),
                                                        "generation": self.cfg["generation"]})
        procs_status(self.payload, b"R")
        self.last_ping = time.monotonic()
        tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._watch_worker())]
        await self.done.wait()
        for task in tasks:
            task.cancel()

    async def _recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            try:
                kind, header, buffers = unpack([f.buffer for f in frames])
            except ServingError as exc:
                log.warning("dropping a malformed message: %s", exc)
                continue
            self.last_ping = time.monotonic()
            if kind is Kind.PING:
                await transport.send(self.sock, Kind.PONG, {"rank": self.rank})
            elif kind is Kind.PREDICT:
                transport.spawn(self._predict(header, buffers, frames))
            elif kind is Kind.EXIT:
                final = bool(header.get("final", True))
                log.info("rank %d told to exit (%s)%s", self.rank, "servable stopped" if final else "re-join",
                         f": {header['error']}" if header.get("error") else "")
                self.finish(0 if final else EXIT_REJOIN)

    async def _predict(self, header: dict[str, Any], buffers: Any, frames: Any) -> None:
        reply: dict[str, Any] = {"id": header.get("id"), "rank": self.rank}
        out_buffers: list[Any] = []
        try:
            raw = header.get("instances")
            instances = None if raw is None else [[decode_value(v, buffers) for v in inst] for inst in raw]
            assert self.shard is not None
            outputs = await asyncio.get_running_loop().run_in_executor(
                self.compute, self._run, header.get("id"), instances, asyncio.get_running_loop())
            if outputs is not None:
                reply["results"] = [{"ok": [encode_value(v, out_buffers) for v in out]} for out in outputs]
        except (ServingError, ValueError) as exc:
            reply["error"] = ServingError(str(getattr(exc, "message", exc))).to_wire()
        except Exception as exc:
            log.exception("rank %d failed on a batch", self.rank)
            reply["error"] = ServingError(f"{type(exc).__name__}: {exc}").to_wire()
        del frames  # inputs were zero-copy views of these frames
        await transport.send(self.sock, Kind.RESULT, reply, out_buffers)

    def _run(self, batch_id: Any, instances: Any, loop: asyncio.AbstractEventLoop) -> Any:
        """On the compute thread: one predict, with `ModelShard.emit` wired to early partial results."""
        assert self.shard is not None

        def emit(index: int, outputs: list[Any]) -> None:
            buffers: list[Any] = []
            header = {"id": batch_id, "rank": self.rank, "partial": index,
                      "ok": [encode_value(v, buffers) for v in outputs]}
            asyncio.run_coroutine_threadsafe(transport.send(self.sock, Kind.RESULT, header, buffers), loop)

        self.shard.emit_hook = emit
        try:
            return self.shard.predict(instances)
        finally:
            self.shard.emit_hook = None

    async def _watch_worker(self) -> None:
        hb = self.cfg["heartbeat"]
        while True:
            await asyncio.sleep(hb["interval_s"])
            if time.monotonic() - self.last_ping > hb["timeout_s"]:
                log.error("rank %d: no heartbeat from the distributed worker for %.1f s", self.rank, hb["timeout_s"])
                self.finish(EXIT_REJOIN)
                return

    async def close(self) -> None:
        if self.exit_code == 1:  # leaving on our own (signal, parent gone): tell the worker at once
            try:
                await asyncio.wait_for(transport.send(self.sock, Kind.EXIT, {"rank": self.rank}), 0.5)
            except Exception:
                pass
        self.sock.close(linger=200)


def procs_status(payload: dict[str, Any], status: bytes) -> None:
    """Tell the startup process how the start went (b"R" ready, b"F<text>" failed) over the status pipe."""
    fd = payload.get("status_fd")
    if fd is None:
        return
    try:
        os.write(int(fd), status[:4096] + b"\n")
    except OSError:
        pass


async def _amain(payload: dict[str, Any]) -> int:
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
        log.error("rank %d failed to start: %s", payload["rank"], "".join(traceback.format_exception(exc)))
        text = f"rank {payload['rank']}: {type(exc).__name__}: {exc}"
        procs_status(payload, b"F" + text.encode(errors="replace"))
        try:
            await asyncio.wait_for(transport.send(agent.sock, Kind.FAILED, {"rank": payload["rank"], "error": text}),
                                   0.5)
        except Exception:
            pass
        agent.sock.close(linger=500)
        return 1
    run.cancel()
    await agent.close()
    return agent.exit_code or 0


def agent_main() -> None:
    payload = procs.read_payload()
    setup_logging(f"agent{payload['rank']}")
    os.environ.update({"RANK_ID": str(payload["rank"]), "DEVICE_ID": str(payload["device_id"])})
    code = asyncio.run(_amain(payload))
    # skip interpreter teardown: a process group with a dead peer can hang in destructors
    procs.exit_now(code)
