"""Thin pyzmq helpers: address parsing with MindSpore's messages, sockets with linger 0, framed send/recv."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import zmq
import zmq.asyncio

from servable_framework.wire import Frame, Kind, pack

log = logging.getLogger("servable_framework.transport")

# plain ints: pyzmq's constants are enums, and every `|` or `&` on them builds a new enum member
_POLLIN, _POLLOUT, _EVENTS = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.EVENTS)
_NOBLOCK, _MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK) | int(zmq.SNDMORE)


def parse_address(address: str, tag: str, allow_unix: bool = True) -> tuple[str, int | None]:
    """``"ip:port"`` -> (ip, port); ``"unix:path"`` -> (path, None). Errors as in contract §5.3."""
    if not isinstance(address, str):
        raise RuntimeError(f"Parameter 'address' should be str, but actually {type(address)}")
    if address.startswith("unix:"):
        if not allow_unix:
            raise RuntimeError(f"{tag} does not support binding to unix domain socket")
        path = address[len("unix:"):]
        if not path:
            raise RuntimeError("Empty grpc server unix domain socket address")
        return path, None
    if ":" not in address:
        raise RuntimeError(f"The format of the {tag} address '{address}' is illegal")
    ip, _, port_text = address.rpartition(":")
    if not ip or not port_text:
        raise RuntimeError(f"Missing ip or port of the {tag} address '{address}'")
    if not port_text.isdigit():
        raise RuntimeError(f"The type of {tag} address '{address}' port is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise RuntimeError(f"The port of the {tag} address '{address}' is out of legal range [1 ~ 65535]")
    return ip, port


def valid_ip(ip: str) -> bool:
    if ip in ("localhost", "0.0.0.0", "*"):
        return True
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


def zmq_endpoint(address: str, tag: str) -> str:
    host, port = parse_address(address, tag)
    return f"ipc://{host}" if port is None else f"tcp://{'*' if host == '0.0.0.0' else host}:{port}"


def async_socket(ctx: zmq.asyncio.Context, kind: int, identity: bytes | None = None,
                 max_msg_bytes: int | None = None) -> zmq.asyncio.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if max_msg_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown/vanished peer raises instead of dropping silently
    return sock


async def send(sock: zmq.asyncio.Socket, kind: Kind, header: dict[str, Any], buffers: Sequence[Frame] = (),
               to: bytes | None = None) -> None:
    frames = pack(kind, header, buffers)
    await sock.send_multipart([to, *frames] if to is not None else frames, copy=False)


_background: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """``create_task`` that keeps a strong reference until the task ends (the loop itself only keeps a weak
    one, so an unreferenced task may be garbage-collected mid-flight)."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop Main and the Workers run on: uvloop's (less work per callback, socket write and timer
    than asyncio's own loop), or asyncio's when uvloop is not installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; kept for a stripped-down install
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopSocket:
    """A ZMQ socket driven straight from an asyncio loop's reader callback, for the hot data paths.

    pyzmq's asyncio wrapper (`zmq.asyncio`) makes a future, a poll-state object and several loop callbacks per
    send and per receive; here a send is one non-blocking ``send_multipart`` (queued in order only when ZMQ
    says "again": high-water mark reached, or a DEALER not yet connected) and every arriving message is handed
    to ``on_message(frames)`` from the loop's reader callback on the socket's file descriptor. That descriptor
    is edge-triggered (it signals a change of ``ZMQ_EVENTS``, not readability), so every callback and every
    send re-reads ``EVENTS`` and drains the socket until it would block.

    ``sock`` may be a `zmq.asyncio.Socket` (as `async_socket` makes): it is shadowed by a plain socket, the
    asyncio one stays usable for what is not I/O (options, a monitor socket, closing) but must not also
    receive. Everything runs on the loop's thread; ``on_message`` must not block.
    """

    BURST = 64  # messages handled per reader callback before yielding to the loop's other callbacks

    def __init__(self, sock: zmq.Socket[Any], on_message: Callable[[list[zmq.Frame]], None]) -> None:
        self.owner = sock
        self.sock: zmq.Socket[Any] = zmq.Socket.shadow(sock.underlying)
        self.on_message = on_message
        self.loop: asyncio.AbstractEventLoop | None = None
        self._outbox: collections.deque[list[Any]] = collections.deque()
        self._scheduled = False
        self._fd = self.sock.FD

    def start(self) -> None:
        """Begin receiving (on the running loop)."""
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self._fd, self._ready)
        self._schedule()  # messages may have arrived before the reader was added: the edge is gone

    def stop(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self._fd)
        self.loop = None

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued message went to ZMQ (at most ``timeout_s``); True when none is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._outbox and loop.time() < deadline:
            self._ready()
            await asyncio.sleep(0.01)
        return not self._outbox

    def send(self, kind: Kind, header: dict[str, Any], buffers: Sequence[Frame] = (), to: bytes | None = None) -> None:
        """Send one message now, or queue it behind those ZMQ could not take yet. Raises `zmq.ZMQError` for a
        ROUTER peer that is not connected (``ROUTER_MANDATORY``). Loop thread only."""
        frames = pack(kind, header, buffers)
        self.send_frames([to, *frames] if to is not None else frames)

    def send_frames(self, frames: list[Any]) -> None:
        if self._outbox:
            self._outbox.append(frames)
        else:
            try:
                self._send(frames)
            except zmq.Again:
                self._outbox.append(frames)
        self._schedule()  # a send may have consumed the descriptor's edge of an arrived message

    def _schedule(self) -> None:
        if not self._scheduled and self.loop is not None:
            self._scheduled = True
            self.loop.call_soon(self._ready)

    def _send(self, frames: list[Any]) -> None:
        """All frames or none (a multipart message is atomic in ZMQ: "again" can only come at the first)."""
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            self.sock.send(frame, _MORE if i < last else _NOBLOCK, copy=False)

    def _events(self) -> int:
        return int(self.sock.getsockopt(_EVENTS))

    def _ready(self) -> None:
        self._scheduled = False
        if self.loop is None or self.sock.closed:
            return
        events = self._events()
        while self._outbox and events & _POLLOUT:
            try:
                self._send(self._outbox[0])
            except zmq.Again:
                break
            except zmq.ZMQError as exc:  # its peer left meanwhile: the request's deadline answers its caller
                log.warning("dropping a queued message: %s", exc)
            self._outbox.popleft()
            events = self._events()
        for _ in range(self.BURST):
            if not events & _POLLIN:
                return
            try:
                frames = self.sock.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self.on_message(frames)
            except Exception:  # a receive loop must never die
                log.exception("handling a message failed")
            if self.loop is None:
                return
            events = self._events()
        self._schedule()  # more are waiting: let other callbacks run first
