"""The Agent startup process's one connection to the Distributed Worker.

A single DEALER socket, kept for the life of the startup process, carries everything this process says to
the Worker (CONFIG requests, FAILED/EXIT notices) and the one thing the Worker says to it unasked: EXIT with
``final`` when the servable stops for good. That notice is what lets a startup process whose Agents are
between generations (one died, the others were told to re-join) stop at once instead of waiting
``config_timeout_s`` for a Worker that will never come back. A Worker that *crashed* sends nothing, so the
startup process keeps asking and re-joins the Worker Main starts in its place.

Thread-safe: the supervisor thread, the main thread and a signal-handling thread all use it; every socket
call happens under one lock and none blocks for long while holding it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from pydantic import ValidationError

from servable_framework import curve, transport
from servable_framework.agent.config import AgentConfig
from servable_framework.errors import ServingError
from servable_framework.wire import Kind, pack, unpack

log = logging.getLogger("servable_framework.agent_startup")

RETRY_S = 1.0  # MindSpore's agent config acquire: 60 x 1 s


class ServableStopped(RuntimeError):
    """The Distributed Worker said the servable is stopped for good (or the caller cancelled the wait)."""


class WorkerLink:
    def __init__(self, address: str, keys: curve.CurveKeys | None = None) -> None:
        """Connect to the Distributed Worker at ``address``, with CurveZMQ when ``keys`` are given."""
        self.address = address
        self.keys = keys
        self.stopped = threading.Event()  # set once the Worker announced the servable's end
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 500)  # a last notice still leaves when the process ends right after
        if keys is not None:
            curve.secure_client(self._sock, keys)
        self._sock.connect(transport.zmq_endpoint(address, "distributed"))

    def close(self) -> None:
        """Close the socket (a notice still queued gets 0.5 s to leave). Later calls are no-ops."""
        with self._lock:
            self._sock.close()

    def notify(self, kind: Kind, error: str, **fields: Any) -> None:
        """Fire-and-forget FAILED/EXIT to the Worker (queued while it is unreachable, dropped at close)."""
        with self._lock:
            if self._sock.closed:
                log.debug("link closed, not sent: %s %s", kind.name, error)
                return
            try:
                self._sock.send_multipart(pack(kind, {"error": error, **fields}), zmq.NOBLOCK)
            except zmq.Again:
                log.warning("could not tell the distributed worker (%s: %s): its queue is full", kind.name, error)

    def poll(self) -> None:
        """Handle whatever the Worker sent since the last call; never blocks."""
        self._drain(0, None)

    def fetch_config(self, timeout_s: float, lost: list[dict[str, Any]] | None = None,
                     cancelled: Callable[[], bool] = lambda: False) -> AgentConfig:
        """Ask the Worker for the agent config, once a second until ``timeout_s``.

        ``lost`` names Agents (rank, pid, error) this process is about to replace: the Worker retires them from
        the current group *before* answering, so the config always carries the generation to join. Each request
        has an id the answer echoes: an answer to any request of this call is taken (a Worker slower than the
        retry period still gets through), one left over from an earlier call (older generation) is ignored.
        Raises `ServableStopped` when the Worker announces the end or ``cancelled()`` turns true, and
        RuntimeError when no config came within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        last_error = "no answer"
        first = None
        while time.monotonic() < deadline:
            if self.stopped.is_set() or cancelled():
                raise ServableStopped("the servable was stopped")
            req = next(self._ids)
            first = first or req
            with self._lock:
                try:
                    self._sock.send_multipart(pack(Kind.CONFIG, {"lost": lost or [], "req": req}), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # the queue to an unreachable Worker is full: wait and ask again
            answer = self._drain(min(RETRY_S, max(deadline - time.monotonic(), 0.0)), first)
            if answer is not None:
                if "error" not in answer:
                    return self._validated(answer.get("config"))
                last_error = str(answer["error"])
                self._sleep_until(min(time.monotonic() + RETRY_S, deadline))  # the Worker is up but not ready
        raise RuntimeError(f"Failed to get the agent config from the distributed worker at {self.address} within "
                           f"{timeout_s:.0f} s ({last_error}); is serving_server.py running?")

    def _validated(self, raw: Any) -> AgentConfig:
        try:
            return AgentConfig.model_validate(raw)
        except ValidationError as exc:  # e.g. hosts running different servable_framework versions
            raise RuntimeError(f"the distributed worker at {self.address} sent an agent config this process cannot "
                               f"use (is the same servable_framework version installed on every host?): "
                               f"{exc}") from None

    def _sleep_until(self, until: float) -> None:
        while not self.stopped.is_set() and time.monotonic() < until:
            self._drain(min(0.1, until - time.monotonic()), None)

    def _drain(self, wait_s: float, since: int | None) -> dict[str, Any] | None:
        """Read messages for up to ``wait_s`` (in 0.1 s slices, releasing the lock between them); returns the
        first CONFIG answer to a request numbered ``since`` or later as soon as it arrives. An EXIT marks the
        link stopped."""
        until = time.monotonic() + wait_s
        while True:
            with self._lock:
                if self._sock.closed:
                    return None
                ready = self._sock.poll(int(min(0.1, max(until - time.monotonic(), 0.0)) * 1000))
                frames = self._sock.recv_multipart(zmq.NOBLOCK) if ready else None
            if frames is not None:
                try:
                    kind, header, _ = unpack(frames)
                except ServingError as exc:
                    log.warning("dropping a malformed message from the distributed worker: %s", exc)
                    continue
                if kind is Kind.EXIT and header.get("final", True):
                    log.info("the distributed worker stopped the servable%s",
                             f": {header['error']}" if header.get("error") else "")
                    self.stopped.set()
                    return None
                req = header.get("req")
                if kind is Kind.CONFIG and since is not None and isinstance(req, int) and req >= since:
                    return header
                continue  # an answer to an earlier request: stale
            if time.monotonic() >= until or self.stopped.is_set():
                return None


def fetch_config(address: str, timeout_s: float, keys_dir: str | None = None) -> AgentConfig:
    """One-off: the agent config of the Distributed Worker at ``address`` (e.g. to read its rank table); keys as
    `startup_agents` (default ``$SERVABLE_KEYS_DIR``)."""
    link = WorkerLink(address, curve.resolve(keys_dir))
    try:
        return link.fetch_config(timeout_s)
    finally:
        link.close()
