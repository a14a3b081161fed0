"""Main's control plane for its Workers: spawn, registration, heartbeats, death and restart.

Guarantees: a Worker is routable only while READY; when it dies, goes silent past the heartbeat timeout,
or reports that its Agents failed, every request in flight on it fails at once with an error naming the
cause (`WorkerLost` when the Worker itself is gone, so that the Dispatcher can re-run the request on a sibling
Worker), and it is restarted (bounded, with back-off) unless Main is stopping. The back-off is a due time
that the monitor loop checks on its ticks, never a sleep inside it: heartbeats to the other Workers go on
while one Worker waits for its restart. A Worker whose restart budget is spent stays DEAD (``given_up``); the
budget is whole again for a Worker that served `Settings.restart_reset_s` since its last restart (it stops crash
loops, not rare crashes); an endpoint (servable, version) with every Worker given up is reported by
`WorkerSet.lost` (``/health`` answers 503 with it). All methods run on Main's event loop thread.
"""

from __future__ import annotations

import asyncio
import enum
import glob
import itertools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from servable_framework import procs, unixlink
from servable_framework.errors import ServingError, StartupError, Unavailable
from servable_framework.settings import Settings
from servable_framework.wire import Frame, Kind, unpack

log = logging.getLogger("servable_framework.main")

StreamItem = tuple[Kind, dict[str, Any], Any, Any] | ServingError


IPC_PREFIX = "servable-main-"  # + Main's pid + "-" + random: the private folder of its Workers' unix socket


def _remove_stale_ipc_dirs() -> None:
    """Remove the unix-socket folders of Mains that are gone without stopping (SIGKILL): a folder names its
    Main's pid; one whose process no longer exists is stale. Best effort."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{IPC_PREFIX}*-*")):
        pid_text = os.path.basename(path)[len(IPC_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive, but not ours to signal
            pass


class WorkerLost(Unavailable):
    """The Worker a request was sent to died, went silent, or could not be reached: nothing of the request
    will come back from it. Main-internal: the Dispatcher re-runs the request on a sibling Worker or turns
    this into a plain `Unavailable` (same text) before any front end sees it."""


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    UNAVAILABLE = "unavailable"  # alive, but cannot serve (its Agents are down)
    DEAD = "dead"


@dataclass
class WorkerHandle:
    worker_id: str
    payload: dict[str, Any]
    log_path: str
    child: procs.Child | None = None
    state: WorkerState = WorkerState.STARTING
    reason: str = ""
    methods: dict[str, list[str]] = field(default_factory=dict)
    streaming: set[str] = field(default_factory=set)  # methods declared stream=True
    signatures: dict[str, Any] = field(default_factory=dict)  # method -> inputs/outputs (worker/signatures.py)
    last_pong: float = field(default_factory=time.monotonic)
    last_ping: float = 0.0
    inflight: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    slow: set[str] = field(default_factory=set)  # methods whose last answer took longer than Main's busy-poll budget
    # streaming requests: request id -> its messages in arrival order ((kind, header, buffers, frames): STREAM
    # pieces, then the RESULT), or the error that failed them
    streams: dict[int, asyncio.Queue[StreamItem]] = field(default_factory=dict)
    started: asyncio.Future[None] | None = None
    restarts: int = 0  # restarts in a row, each dying before it ran `Settings.restart_reset_s`
    ready_at: float | None = None  # monotonic time its current process registered (None: not yet)
    restart_due: float | None = None  # monotonic time of the scheduled restart (DEAD, budget left)
    given_up: bool = False  # DEAD for good: its restart budget is spent
    batch_size: int = 0  # the smallest model batch size of its servable, from its REGISTER (0: no model)
    instances_answered: int = 0  # instances of requests this Worker answered (results or per-instance errors)
    request_timeout_s: float | None = None  # the servable's own default, from its REGISTER
    batch_stats: dict[str, list[int]] = field(default_factory=dict)  # model -> [batches, instances, joined, ...]

    @property
    def servable(self) -> str:
        return str(self.payload["servable_name"])

    @property
    def version(self) -> int:
        return int(self.payload["version"])

    @property
    def label(self) -> str:
        pid = self.child.pid if self.child else "-"
        return f"worker {self.worker_id} (servable '{self.servable}' version {self.version}, pid {pid})"


class WorkerSet:
    """All Workers of this Main, and the unix socket (`unixlink.LinkServer`) they connect to."""

    _ids = itertools.count()

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Workers are always this machine's children: a unix socket in a private 0700 folder, reachable by nobody
        # else, driven by the loop itself (`unixlink`: no ZMQ I/O thread between a message and its socket)
        _remove_stale_ipc_dirs()
        self._ipc_dir = tempfile.mkdtemp(prefix=f"{IPC_PREFIX}{os.getpid()}-")
        self.address = f"{self._ipc_dir}/workers"
        self.io = unixlink.LinkServer(self.address, self._on_frames)
        self.workers: dict[str, WorkerHandle] = {}
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        log.info("Master server start success, listening on %s", self.address)

    async def run(self) -> None:
        await self.io.start()
        self._tasks = [asyncio.create_task(self._monitor_loop())]

    # -- start ----------------------------------------------------------------------------------------------
    def spawn(self, payload: dict[str, Any], log_name: str) -> WorkerHandle:
        worker_id = f"w{next(self._ids)}"
        os.makedirs(self.settings.log_dir, exist_ok=True)
        payload = {**payload, "worker_id": worker_id, "main_address": self.address,
                   "heartbeat": {"interval_s": self.settings.heartbeat_interval_s,
                                 "timeout_s": self.settings.heartbeat_timeout_s,
                                 "step_timeout_s": self.settings.step_timeout_s,
                                 "group_timeout_s": self.settings.group_timeout_s},
                   "keep_freed_mib": self.settings.keep_freed_mib}
        handle = WorkerHandle(worker_id, payload, os.path.join(self.settings.log_dir, log_name))
        self.workers[worker_id] = handle
        self._launch(handle)
        return handle

    def _launch(self, handle: WorkerHandle) -> None:
        handle.state = WorkerState.STARTING
        handle.restart_due = None
        handle.ready_at = None
        handle.reason = ""  # a start error (FAILED) of this launch may fill it
        if handle.started is None:  # only the first start is awaited (start_servables); restarts are not
            handle.started = asyncio.get_running_loop().create_future()
        handle.last_pong = time.monotonic()
        handle.child = procs.spawn("servable_framework.worker", handle.payload, f"worker {handle.worker_id}",
                                   handle.log_path)

    async def wait_started(self, handles: list[WorkerHandle], timeout_s: float | None) -> None:
        """Until every handle registered; raises `StartupError` with the Worker's own error text."""
        futures = [h.started for h in handles if h.started is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
        except asyncio.TimeoutError:
            raise StartupError(f"Fail to start workers: not ready within {timeout_s} s") from None

    # -- messages -------------------------------------------------------------------------------------------
    async def send(self, handle: WorkerHandle, kind: Kind, header: dict[str, Any], buffers: Any = ()) -> None:
        """Raises `Unavailable` when the Worker's connection is gone (it died or is restarting)."""
        try:
            self.io.send(kind, header, buffers, to=handle.worker_id.encode())
        except unixlink.LinkError as exc:
            raise WorkerLost(f"Request servable({handle.servable}) version({handle.version}) , servable is not "
                             f"available: {handle.label} is unreachable ({exc})") from None

    def _on_frames(self, identity: bytes, frames: list[Frame]) -> None:
        """One message from a Worker (called by the link on the loop)."""
        ident = identity.decode(errors="replace")
        handle = self.workers.get(ident)
        try:
            kind, header, buffers = unpack(frames)
        except ServingError as exc:
            log.warning("malformed message from %s: %s", ident, exc)
            return
        if handle is None:
            return
        try:
            self._on_message(handle, kind, header, buffers, frames)
        except Exception:  # the control loop must never die
            log.exception("handling %s from %s failed", kind.name, handle.label)

    def _on_message(self, handle: WorkerHandle, kind: Kind, header: dict[str, Any], buffers: Any,
                    frames: Any) -> None:
        handle.last_pong = time.monotonic()
        if kind is Kind.RESULT:
            handle.batch_stats = header.get("batches", handle.batch_stats)
            fut = handle.inflight.pop(header.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result((header, buffers, frames))
            stream = handle.streams.pop(header.get("id", -1), None)
            if stream is not None:
                stream.put_nowait((kind, header, buffers, frames))
        elif kind is Kind.STREAM:
            stream = handle.streams.get(header.get("id", -1))
            if stream is not None:
                stream.put_nowait((kind, header, buffers, frames))
        elif kind is Kind.REGISTER:
            handle.methods = header.get("methods", {})
            handle.streaming = set(header.get("streaming", []))
            handle.signatures = header.get("signatures", {})
            handle.request_timeout_s = header.get("request_timeout_s")
            handle.batch_size = int(header.get("batch_size", 0) or 0)
            handle.payload["version"] = int(header.get("version", handle.version))  # 0 resolved to a real one
            handle.state = WorkerState.READY
            handle.ready_at = time.monotonic()
            handle.reason = ""
            log.info("Register success: %s ready", handle.label)
            if handle.started is not None and not handle.started.done():
                handle.started.set_result(None)
        elif kind is Kind.FAILED:
            error = str(header.get("error", "unknown error"))
            if header.get("fatal", True):
                handle.reason = error
                if handle.started is not None and not handle.started.done():
                    handle.started.set_exception(StartupError(f"Fail to start workers: {error}"))
                else:  # a restart failed to start: nobody awaits it, say it here
                    log.error("%s failed to start: %s", handle.label, error)
            else:
                log.error("%s is unavailable: %s", handle.label, error)
                self._make_unavailable(handle, WorkerState.UNAVAILABLE, error)
        elif kind is Kind.PONG:
            handle.batch_stats = header.get("batches", {})
        elif kind is Kind.EXIT:
            log.info("%s is exiting", handle.label)

    def _make_unavailable(self, handle: WorkerHandle, state: WorkerState, reason: str, lost: bool = False) -> None:
        """Mark ``handle`` and fail what is in flight on it. ``lost``: the Worker process is gone (died, went
        silent): its requests fail with `WorkerLost`, which the Dispatcher may re-run elsewhere; streams
        always fail (pieces may have reached the client already)."""
        handle.state = state
        handle.reason = reason
        text = f"Request servable({handle.servable}) version({handle.version}) , servable is not available: {reason}"
        error = WorkerLost(text) if lost else Unavailable(text)
        for fut in handle.inflight.values():
            if not fut.done():
                fut.set_exception(error)
        handle.inflight.clear()
        for stream in handle.streams.values():
            stream.put_nowait(Unavailable(text))
        handle.streams.clear()

    def lost(self) -> list[str]:
        """One line per endpoint (servable, version) whose every Worker is DEAD for good (restart budget spent):
        what ``/health`` reports. Empty while Main is stopping."""
        if self.stopping:
            return []
        endpoints: dict[tuple[str, int], list[WorkerHandle]] = {}
        for h in self.workers.values():
            endpoints.setdefault((h.servable, h.version), []).append(h)
        out = []
        for (servable, version), handles in sorted(endpoints.items()):
            if all(h.given_up for h in handles):
                reasons = "; ".join(sorted({h.reason for h in handles if h.reason}))
                out.append(f"servable '{servable}' version {version} has no Worker left (restart limit "
                           f"{self.settings.worker_restart_max} reached): {reasons}")
        return out

    # -- monitor --------------------------------------------------------------------------------------------
    async def _monitor_loop(self) -> None:
        """Every tick: ping each Worker whose interval is up, find the dead and the silent, start the restarts
        that are due. Nothing in here waits for long (a restart's back-off is a due time, `_on_death`), so one
        Worker's trouble never delays the heartbeats of the others."""
        s = self.settings
        while True:
            await asyncio.sleep(min(0.1, s.heartbeat_interval_s))
            now = time.monotonic()
            for handle in list(self.workers.values()):
                try:
                    await self._check(handle, now)
                except Exception:  # the control loop must never die
                    log.exception("monitoring %s failed", handle.label)

    async def _check(self, handle: WorkerHandle, now: float) -> None:
        if handle.state is WorkerState.DEAD:
            if handle.restart_due is not None and now >= handle.restart_due and not self.stopping:
                log.warning("restarting %s (attempt %d/%d)", handle.label, handle.restarts,
                            self.settings.worker_restart_max)
                self._launch(handle)
            return
        if handle.child is None:
            return
        if not handle.child.alive():
            code = handle.child.proc.returncode
            why = f": {handle.reason}" if handle.reason else ""  # the start error it reported, if any
            self._on_death(handle, f"{handle.label} exited with code {code}{why}", now)
            return
        if handle.state is WorkerState.STARTING:
            return  # loading can take long; the start deadline covers it
        if now - handle.last_pong > self.settings.heartbeat_timeout_s:
            await procs.aterminate([handle.child], grace_s=0)
            self._on_death(handle, f"{handle.label} missed heartbeats for "
                                   f"{self.settings.heartbeat_timeout_s:.1f} s", now)
            return
        if now - handle.last_ping >= self.settings.heartbeat_interval_s:
            handle.last_ping = now
            try:
                await self.send(handle, Kind.PING, {})
            except Unavailable:
                pass  # its death or silence is handled above on a later tick

    def _on_death(self, handle: WorkerHandle, reason: str, now: float) -> None:
        """Fail what was in flight on the dead Worker, then schedule its restart (``restart_due``, checked by
        `_check`) or give it up. A death during the first start is `start_servables`' business (it fails
        and removes the Worker); a death while a restart loads counts against the budget like any other."""
        first_start = handle.state is WorkerState.STARTING and handle.restarts == 0
        self._make_unavailable(handle, WorkerState.DEAD, reason, lost=True)
        if handle.started is not None and not handle.started.done():
            detail = f": {handle.reason}" if handle.reason else " because of death of one worker"
            handle.started.set_exception(StartupError(f"Fail to start workers{detail}"))
        if self.stopping or first_start:
            return
        log.error("%s", reason)
        served_s = now - handle.ready_at if handle.ready_at is not None else 0.0
        if handle.restarts and served_s >= self.settings.restart_reset_s:
            log.info("%s served for %.0f s since its last restart: its restart budget is whole again", handle.label,
                     served_s)
            handle.restarts = 0
        if handle.restarts >= self.settings.worker_restart_max:
            handle.given_up = True
            log.error("%s: restart limit (%d) reached, giving up", handle.label, self.settings.worker_restart_max)
            for line in self.lost():
                if f"'{handle.servable}' version {handle.version} " in line:
                    log.error("%s", line)
            return
        handle.restarts += 1
        delay = min(2.0 ** (handle.restarts - 1), 10.0)
        handle.restart_due = now + delay
        log.warning("restarting %s in %.1f s (attempt %d/%d)", handle.label, delay, handle.restarts,
                    self.settings.worker_restart_max)

    # -- stop -----------------------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Tell every Worker to exit, then escalate (one path, idempotent)."""
        self.stopping = True
        for handle in self.workers.values():
            if handle.child is not None and handle.child.alive():
                try:
                    await self.send(handle, Kind.EXIT, {})
                except Unavailable:
                    pass
        children = [h.child for h in self.workers.values() if h.child is not None]
        await procs.aterminate(children, self.settings.graceful_timeout_s)
        for handle in self.workers.values():
            self._make_unavailable(handle, WorkerState.DEAD, "server is stopping")
        for task in self._tasks:
            task.cancel()
        self.io.stop()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
