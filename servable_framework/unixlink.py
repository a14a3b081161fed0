"""Main <-> Worker link: multipart messages over a unix stream socket, driven by the event loop itself.

Main's Workers are always its own children on its own host, so their link needs none of ZMQ's reach (TCP,
reconnection, CurveZMQ): what it needs is a cheap message. A ZMQ send hands the message to libzmq's I/O thread
(a mailbox write and a wake-up of that thread, which then does the socket write) and a receive goes the other
way; on the 2-core VM that was the largest single cost of a small request in both processes (py-spy under
``wrk`` c=8: ``Socket.send`` 11 % of Main's samples and 32 % of the Worker's). Here a send is one ``writev`` from
the loop's thread (uvloop) and a receive is the loop's own read callback. Measured with two processes echoing
300-byte messages: round trip p50 26-32 us vs 82-113 us over ZMQ ``ipc://``, CPU 5-13 us vs 26-49 us per message.

Wire: a message is ``<u32 n> <u64 len_0> ... <u64 len_n-1> <frame_0> ... <frame_n-1>`` (little-endian), the
frames being those `wire.pack` builds (so no pickle, tensors as raw buffers). The first message of a connection
is the connecting side's identity, one frame. Small frames are copied out of a staging buffer; a frame above
`DIRECT_BYTES` is received straight into its own buffer (one kernel copy, nothing more) and handed on as a
read-only memoryview. Everything runs on the loop's thread; ``on_message`` must not block.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any, cast

from servable_framework.wire import Frame, Kind, pack

log = logging.getLogger("servable_framework.unixlink")

STAGING_BYTES = 256 * 1024  # the read buffer small messages are parsed from
DIRECT_BYTES = 64 * 1024  # a frame this size or more is received into its own buffer
MAX_FRAMES = 16 * 1024  # a header larger than this is a broken peer: the connection is closed
_COUNT = struct.Struct("<I")

OnMessage = Callable[[list[Frame]], None]


class LinkError(ConnectionError):
    """The peer a message is addressed to is not connected (it died, or has not connected yet)."""


def encode(frames: Sequence[Frame]) -> list[Frame]:
    """``frames`` with the length prefix in front, ready for ``writelines`` (the frames are not copied)."""
    # nbytes, not len: a memoryview of a float32 array has len() = its element count
    return [struct.pack(f"<I{len(frames)}Q", len(frames), *(memoryview(f).nbytes for f in frames)), *frames]


class _Protocol(asyncio.BufferedProtocol):
    """One connection's reader: parses messages as bytes arrive, hands each to ``on_message``."""

    def __init__(self, on_message: OnMessage, on_lost: Callable[[_Protocol], None],
                 identity: bytes | None = None, on_identity: Callable[[_Protocol], None] | None = None,
                 max_bytes: int | None = None) -> None:
        self.on_message = on_message
        self.max_bytes = max_bytes  # a message declaring more bytes closes the connection (None: no limit)
        self.on_lost = on_lost
        self.on_identity = on_identity  # accepting side: called once the peer has named itself
        self.transport: asyncio.Transport | None = None
        self.identity = identity  # None on the accepting side until the peer's first message names it
        self._staging = bytearray(STAGING_BYTES)
        self._view = memoryview(self._staging)
        self._start = self._end = 0  # unparsed bytes: staging[start:end]
        self._lengths: tuple[int, ...] | None = None  # frame lengths of the message being read
        self._frames: list[Frame] = []
        self._direct: memoryview | None = None  # a large frame being received into its own buffer
        self._direct_at = 0

    # -- asyncio.BufferedProtocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.on_lost(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None:
            return self._direct[self._direct_at:]
        if self._end == len(self._staging):  # full: move the unparsed tail to the front
            self._compact()
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is not None:
            self._direct_at += nbytes
            if self._direct_at < len(self._direct):
                return
            self._frames.append(self._direct.toreadonly())
            self._direct = None
        else:
            self._end += nbytes
        try:
            self._parse()
        except ValueError as exc:  # only our own processes connect here: a broken one is closed, not trusted
            log.error("closing a link connection: %s", exc)
            if self.transport is not None:
                self.transport.abort()

    # -- parsing --------------------------------------------------------------------------------------------
    def _compact(self) -> None:
        size = self._end - self._start
        if self._start:
            self._view[:size] = bytes(self._view[self._start:self._end])
        self._start, self._end = 0, size

    def _parse(self) -> None:
        while True:
            if self._lengths is None:
                available = self._end - self._start
                if available < 4:
                    return
                (count,) = _COUNT.unpack_from(self._staging, self._start)
                if not 1 <= count <= MAX_FRAMES:
                    raise ValueError(f"bad frame count {count}")
                size = 4 + 8 * count
                if available < size:
                    return
                self._lengths = struct.unpack_from(f"<{count}Q", self._staging, self._start + 4)
                self._start += size
                if self.max_bytes is not None and sum(self._lengths) > self.max_bytes:
                    raise ValueError(f"a message of {sum(self._lengths)} bytes, over the limit {self.max_bytes}")
            while len(self._frames) < len(self._lengths):
                length = self._lengths[len(self._frames)]
                available = self._end - self._start
                if length <= available and length < DIRECT_BYTES:
                    self._frames.append(bytes(self._view[self._start:self._start + length]))
                    self._start += length
                    continue
                if length < DIRECT_BYTES:  # a small frame not all here yet
                    return
                # a large frame: what arrived goes into its own buffer, the rest is read straight into it
                buffer = memoryview(bytearray(length))
                taken = min(available, length)
                buffer[:taken] = self._view[self._start:self._start + taken]
                self._start += taken
                if taken < length:
                    self._direct, self._direct_at = buffer, taken
                    return
                self._frames.append(buffer.toreadonly())
            frames, self._frames, self._lengths = self._frames, [], None
            if self._start == self._end:
                self._start = self._end = 0
            self._deliver(frames)

    def _deliver(self, frames: list[Frame]) -> None:
        if self.identity is None:  # accepting side: the first message names the peer
            self.identity = bytes(frames[0])
            if self.on_identity is not None:
                self.on_identity(self)
            return
        try:
            self.on_message(frames)
        except Exception:  # a receive loop must never die
            log.exception("handling a message failed")


class LinkServer:
    """Main's end: Workers (and local Clients, `servable_framework.main.zmq_frontend`) connect to a unix socket at
    ``path``; ``on_message(identity, frames)`` gets every message, ``send(..., to=identity)`` answers (as a ZMQ
    ROUTER would, raising `LinkError` when that peer is not connected). A peer that connects again under the same
    identity (a restarted Worker) replaces the old one. ``max_bytes``: a larger message closes its connection."""

    def __init__(self, path: str, on_message: Callable[[bytes, list[Frame]], None],
                 max_bytes: int | None = None) -> None:
        self.path = path
        self.on_message = on_message
        self.max_bytes = max_bytes
        self.peers: dict[bytes, _Protocol] = {}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._new_protocol, self.path)
        os.chmod(self.path, 0o600)  # the folder is 0700 already; the socket is this user's alone too

    def _new_protocol(self) -> _Protocol:
        proto: _Protocol = _Protocol(lambda frames: self.on_message(cast(bytes, proto.identity), frames), self._lost,
                                     on_identity=self._joined, max_bytes=self.max_bytes)
        return proto

    def _joined(self, proto: _Protocol) -> None:
        """The peer named itself: reachable from now on (before it sends anything else)."""
        assert proto.identity is not None
        old = self.peers.get(proto.identity)
        self.peers[proto.identity] = proto
        if old is not None and old.transport is not None:
            old.transport.close()

    def _lost(self, proto: _Protocol) -> None:
        if proto.identity is not None and self.peers.get(proto.identity) is proto:
            del self.peers[proto.identity]

    def send(self, kind: Kind, header: dict[str, Any], buffers: Sequence[Frame] = (), *, to: bytes) -> None:
        self.send_frames(pack(kind, header, buffers), to=to)

    def send_frames(self, frames: Sequence[Frame], *, to: bytes) -> None:
        proto = self.peers.get(to)
        if proto is None or proto.transport is None or proto.transport.is_closing():
            raise LinkError(f"peer {to.decode(errors='replace')} is not connected")
        proto.transport.writelines(encode(frames))

    def stop(self) -> None:
        for proto in list(self.peers.values()):
            if proto.transport is not None:
                proto.transport.abort()
        self.peers.clear()
        if self._server is not None:
            self._server.close()
            self._server = None


class LinkClient:
    """A Worker's end: connects to ``path`` as ``identity`` (on `start`, in the background); messages sent
    before the connection is up wait in order, as on a ZMQ DEALER. ``on_message(frames)`` gets every message."""

    def __init__(self, path: str, identity: bytes, on_message: OnMessage) -> None:
        self.path = path
        self.identity = identity
        self.on_message = on_message
        self._proto: _Protocol | None = None
        self._outbox: collections.deque[Sequence[Frame]] = collections.deque([[identity]])
        self._task: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()  # set when the connection ends (Main is gone or closed it)

    def start(self) -> None:
        """Connect in the background (on the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:  # this side knows who it is: every message it receives goes to on_message
            transport, proto = await loop.create_unix_connection(
                lambda: _Protocol(self.on_message, lambda _: self.lost.set(), self.identity), self.path)
        except OSError as exc:
            log.error("cannot connect to Main at %s: %s", self.path, exc)
            self.lost.set()
            return
        self._proto = proto
        while self._outbox:
            transport.writelines(encode(self._outbox.popleft()))

    def send(self, kind: Kind, header: dict[str, Any], buffers: Sequence[Frame] = ()) -> None:
        self.send_frames(pack(kind, header, buffers))

    def send_frames(self, frames: Sequence[Frame]) -> None:
        """Send now, or queue until connected. Loop thread only. Dropped once the connection is gone."""
        proto = self._proto
        if proto is None:
            self._outbox.append(frames)
        elif proto.transport is not None and not proto.transport.is_closing():
            proto.transport.writelines(encode(frames))

    async def drain(self, timeout_s: float) -> bool:
        """Wait until everything sent was written to the socket (at most ``timeout_s``); True when it was."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            proto = self._proto
            if proto is not None and (proto.transport is None or proto.transport.get_write_buffer_size() == 0) \
                    and not self._outbox:
                return True
            if self.lost.is_set():
                return False
            await asyncio.sleep(0.01)
        return False

    def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()  # writes what is buffered, then closes
