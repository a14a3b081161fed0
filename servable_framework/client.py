"""``servable_framework.client``: the binary ZMQ client (MindSpore's gRPC ``Client``, contract §10).

    client = Client("127.0.0.1:5500", "add", "add_common")
    result = client.infer([{"x1": np.ones((2, 2), np.float32), "x2": np.ones((2, 2), np.float32)}])
    # -> [{"y": array([[2., 2.], [2., 2.]], dtype=float32)}]

Results: one dict per instance (numpy arrays; a single string -> ``str``; bytes -> ``bytes``); a failed
instance is ``{"error": text}``; a whole-request failure returns ``{"error": text}`` instead of a list.
A server that is down or silent gives ``{"error": "ZMQ Error, (14, 'unavailable'), ..."}`` after
``connect_timeout_s`` / ``timeout_s``; calls never block forever. A connection lost while calls wait ends them at
once (``unavailable``: their replies cannot come back on a new connection), and so does a reply the client cannot
decode (``ZMQ Error, (13, 'internal'), malformed reply ...``: the call it names, or every waiting call when it
names none). One Client may be used from many threads.

Streaming methods (``register_method(..., stream=True)``): ``for piece in client.infer_stream(instances)``
yields pieces as the server produces them (see `Client.infer_stream`).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, NamedTuple, Protocol

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from servable_framework import curve, shm, transport, unixlink
from servable_framework.servable import checks
from servable_framework.wire import DTYPES, WIRE_NAMES, Kind, Value, decode_value, encode_value, pack, unpack

log = logging.getLogger("servable_framework.client")

Reply = list[dict[str, Any]] | dict[str, Any]
UNAVAILABLE = "ZMQ Error, (14, 'unavailable')"
DEADLINE = "ZMQ Error, (4, 'deadline exceeded')"
RESOURCE_EXHAUSTED = "ZMQ Error, (8, 'resource exhausted')"
INTERNAL = "ZMQ Error, (13, 'internal')"
CLIENT_MAX_BYTES = 512 * 1024 * 1024


def _to_value(value: Any) -> Value:
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype not in WIRE_NAMES and arr.dtype.name not in DTYPES:  # (a native dtype is found as itself)
            raise RuntimeError(f"Unknown data type {arr.dtype}")
        return arr
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, bool):
        return np.array([value], dtype=np.bool_)
    if isinstance(value, int):
        return np.array([value], dtype=np.int64)
    if isinstance(value, float):
        return np.array([value], dtype=np.float64)
    raise RuntimeError(f"Not support value type {type(value)}")


def _instances(instances: Any) -> list[dict[str, Value]]:
    items = [instances] if isinstance(instances, dict) else instances
    if not isinstance(items, (list, tuple)):
        raise RuntimeError("instance should be a map")
    out = []
    for inst in items:
        if not isinstance(inst, dict):
            raise RuntimeError("instance should be a map")
        out.append({str(k): _to_value(v) for k, v in inst.items()})
    return out


def _decode_reply(header: dict[str, Any], buffers: Any, lease: shm.Lease | None = None) -> Reply:
    """The reply's results; outputs in shared memory are copied out of the call's segment (``lease``)."""
    errors = header.get("error_msg") or []
    instances = header.get("instances")
    if instances is None:
        return {"error": errors[0]["msg"] if errors else "unknown error"}
    out: list[dict[str, Any]] = []
    for i, inst in enumerate(instances):
        if errors and errors[i].get("code", 0) != 0:
            out.append({"error": errors[i]["msg"]})
        else:
            out.append({k: decode_value(v, buffers, None if lease is None else lease.read) for k, v in inst.items()})
    return out


def _take_reply(header: dict[str, Any], buffers: Any, lease: shm.Lease | None, source: str) -> Reply:
    """A call's RESULT decoded (an error reply when it cannot be), its shared-memory lease finished; on a decode
    error the lease is left to the caller, which discards it."""
    try:
        reply = _decode_reply(header, buffers, lease)
    except Exception as exc:
        return {"error": f"{INTERNAL}, malformed reply from {source}: {exc}"}
    if lease is not None:
        lease.finish(answered=_worker_done(reply))
    return reply


def _worker_done(reply: Reply) -> bool:
    """Whether a reply shows the Worker done with the call's shared memory: results came. A whole-request error
    may come from Main while the Worker still runs (a timeout, a lost Worker): its segment is never reused."""
    return isinstance(reply, list)


def _refused(reply: Reply) -> bool:
    """Whether a whole-request error says the server cannot take this client's shared-memory tensors."""
    return isinstance(reply, dict) and shm.REFUSED in str(reply.get("error", ""))


class StreamError(RuntimeError):
    """`Client.infer_stream` failed: the whole request (refused, timed out, the server unreachable or failing
    midway; ``errors`` is empty), or some of its instances (``errors``: instance index -> error text; the text
    of the exception is the first one's). The text is the server's error text (or the client's ``ZMQ Error``)."""

    def __init__(self, message: str, errors: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors or {}


class _Waiter(Protocol):
    """What a pending request's replies go to (called on the I/O thread)."""

    def deliver(self, kind: Kind, header: dict[str, Any], buffers: Any) -> bool:
        """Take one message; True when it was the last (the request is over)."""

    def fail(self, text: str) -> None:
        """The request is over without a reply (unreachable server, deadline)."""


class _FutureWaiter:
    """`infer_async`: the one RESULT resolves a future. With shared memory (``lease``), a reply that refuses it
    calls ``retry`` (which sends the request again inline, for the same future) instead."""

    def __init__(self, fut: Future[Reply], lease: shm.Lease | None = None,
                 retry: Callable[[], None] | None = None) -> None:
        self.fut = fut
        self.lease = lease
        self.retry = retry

    def deliver(self, kind: Kind, header: dict[str, Any], buffers: Any) -> bool:
        if kind is not Kind.RESULT:
            return False
        reply = _decode_reply(header, buffers, self.lease)  # raising: `fail` discards the lease
        if self.lease is not None:
            self.lease.finish(answered=_worker_done(reply))
        if self.retry is not None and _refused(reply):
            self.retry()
        else:
            self.fut.set_result(reply)
        return True

    def fail(self, text: str) -> None:
        if self.lease is not None:
            self.lease.finish(answered=False)
        self.fut.set_result({"error": text})


_END = object()


class _StreamWaiter:
    """`infer_stream`: pieces and the end go to a queue the caller's generator reads."""

    def __init__(self) -> None:
        self.items: queue.SimpleQueue[Any] = queue.SimpleQueue()  # piece dicts, StreamError, or _END

    def deliver(self, kind: Kind, header: dict[str, Any], buffers: Any) -> bool:
        if kind is Kind.STREAM:
            for raw in header.get("pieces", []):
                self.items.put(_decode_piece(raw, buffers))
            return False
        errors = header.get("error_msg") or []
        self.items.put(StreamError(errors[0].get("msg", "unknown error")) if errors else _END)
        return True

    def fail(self, text: str) -> None:
        self.items.put(StreamError(text))


def _decode_piece(raw: dict[str, Any], buffers: Any) -> dict[str, Any]:
    if "error" in raw:
        return {"index": raw.get("index"), "error": raw["error"].get("msg", "unknown error")}
    outputs = {k: decode_value(v, buffers) for k, v in raw.get("outputs", {}).items()}
    return {"index": raw.get("index"), **outputs, "finish_reason": raw.get("finish")}


class _Channel:
    """Owns the DEALER socket in one I/O thread; callers hand requests over a queue (ZMQ sockets are not
    thread-safe). Replies are matched to waiters by request id; deadlines are enforced here."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, connect_timeout_s: float, keys: curve.CurveKeys | None) -> None:
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self.keys = keys
        # (rid, frames, waiter, deadline); waiter None: a message without a reply (CANCEL: forget rid)
        self.outbox: queue.Queue[tuple[int, list[Any], _Waiter | None, float]] = queue.Queue()
        self.pending: dict[int, tuple[_Waiter, float]] = {}
        self.wake_r, self.wake_w = os.pipe()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="zmq-client", daemon=True)
        self.thread.start()

    def submit(self, rid: int, frames: list[Any], waiter: _Waiter | None, deadline: float) -> None:
        self.outbox.put((rid, frames, waiter, deadline))
        os.write(self.wake_w, b"x")

    def _run(self) -> None:
        sock = _dealer(zmq.Context.instance(), self.endpoint, self.keys)
        # a lost connection must end the calls waiting on it: their replies would go to the old peer identity
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        waiting: list[tuple[int, list[Any], _Waiter | None, float, float]] = []  # not yet sent: no connection
        while not self.closed:
            events = dict(poller.poll(50))
            if self.wake_r in events:
                os.read(self.wake_r, 4096)
            while not self.outbox.empty():
                rid, frames, waiter, deadline = self.outbox.get_nowait()
                if waiter is None:
                    self.pending.pop(rid, None)  # its caller gave up: no more replies for it
                waiting.append((rid, frames, waiter, deadline, time.monotonic() + self.connect_timeout_s))
            waiting = [w for w in waiting if not self._try_send(sock, *w)]
            if sock in events:
                self._receive(sock)
            if monitor in events:
                self._on_monitor(monitor)
            self._expire()
        self._fail_all(f"{UNAVAILABLE}, the client was closed")
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)

    def _fail_all(self, text: str) -> None:
        pending, self.pending = self.pending, {}
        for waiter, _ in pending.values():
            waiter.fail(text)

    def _on_monitor(self, monitor: zmq.Socket[Any]) -> None:
        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED and self.pending:
                self._fail_all(f"{UNAVAILABLE}, the connection to {self.endpoint} was lost before the reply came")

    def _try_send(self, sock: zmq.Socket[Any], rid: int, frames: list[Any], waiter: _Waiter | None, deadline: float,
                  connect_deadline: float) -> bool:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if time.monotonic() < connect_deadline:
                return False
            if waiter is not None:
                waiter.fail(f"{UNAVAILABLE}, cannot connect to {self.endpoint} within {self.connect_timeout_s:g} s; "
                            f"is the server running?")
            return True
        if waiter is not None:
            self.pending[rid] = (waiter, deadline)
        return True

    def _receive(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                kind, header, buffers = unpack([f.buffer for f in frames])
            except Exception as exc:  # nothing names its call: every waiting call may be the one it answered
                self._fail_all(f"{INTERNAL}, malformed reply from {self.endpoint}: {exc}")
                continue
            rid = header.get("id")
            if not isinstance(rid, int):
                self._fail_all(f"{INTERNAL}, malformed reply from {self.endpoint}: no request id")
                continue
            entry = self.pending.get(rid)
            if entry is None:
                continue  # a call that already ended (deadline, cancel): its late reply is dropped
            try:
                done = entry[0].deliver(kind, header, buffers)
            except Exception as exc:  # its outputs cannot be decoded: this call fails now, not at its deadline
                done = True
                entry[0].fail(f"{INTERNAL}, malformed reply from {self.endpoint}: {exc}")
            if done:
                del self.pending[rid]

    def _expire(self) -> None:
        now = time.monotonic()
        for rid, (waiter, deadline) in list(self.pending.items()):
            if now > deadline:
                del self.pending[rid]
                waiter.fail(f"{DEADLINE}, no reply from {self.endpoint} in time")

    def close(self) -> None:
        self.closed = True
        os.write(self.wake_w, b"x")
        self.thread.join(timeout=2)
        os.close(self.wake_r)
        os.close(self.wake_w)


class _SyncSocket:
    """`Client.infer` on the calling thread: that thread's own DEALER socket, written and polled by the caller
    itself. Through the I/O thread (`_Channel`) a call costs two thread wake-ups (caller -> I/O thread -> caller),
    about 200 us of a 780 us round trip at concurrency 1 on the 2-core VM; here it costs none. The same rules as
    the channel: IMMEDIATE (a down server is noticed: unavailable after the connect timeout), the deadline, a lost
    connection and a malformed reply end the call at once. A reply with another request id is a late answer to an
    earlier call of this thread that gave up: dropped."""

    def __init__(self, endpoint: str, keys: curve.CurveKeys | None) -> None:
        self.endpoint = endpoint
        self.sock = _dealer(zmq.Context.instance(), endpoint, keys)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.busy = threading.Lock()  # held by the owning thread during a call
        self.closed = False
        self._expect = Kind.RESULT  # the kind of message that answers the call in progress

    def call(self, rid: int, frames: list[Any], deadline: float, connect_timeout_s: float,
             lease: shm.Lease | None = None) -> Reply:
        """The reply to one request; its shared-memory ``lease`` is finished (answered or not) on return."""
        try:
            with self.busy:
                if self.closed:
                    return {"error": f"{UNAVAILABLE}, the client was closed"}
                reply = self._call(rid, frames, deadline, connect_timeout_s, lease)
        finally:
            if lease is not None:
                lease.finish(answered=False)  # a no-op when `_receive` took the reply
        if self.closed:  # the Client was closed during the call
            self.close()
        return reply

    def ask_local(self, rid: int, deadline: float, connect_timeout_s: float) -> str | None:
        """Main's unix socket for Clients on its host (a LOCAL message), or None: none, or no answer in time."""
        with self.busy:
            if self.closed:
                return None
            self._expect = Kind.LOCAL
            try:
                reply = self._call(rid, pack(Kind.LOCAL, {"id": rid}), deadline, connect_timeout_s, None)
            finally:
                self._expect = Kind.RESULT
        path = reply.get("path") if isinstance(reply, dict) else None
        return path if isinstance(path, str) and path else None

    def _call(self, rid: int, frames: list[Any], deadline: float, connect_timeout_s: float,
              lease: shm.Lease | None) -> Reply:
        while self.monitor.poll(0):  # disconnects of an earlier call's time are not this call's
            recv_monitor_message(self.monitor)
        connect_deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:  # not connected (IMMEDIATE): wait for the connection, up to the connect timeout
                left = connect_deadline - time.monotonic()
                if left <= 0:
                    return {"error": f"{UNAVAILABLE}, cannot connect to {self.endpoint} within "
                                     f"{connect_timeout_s:g} s; is the server running?"}
                self.sock.poll(max(1, int(min(left, 0.05) * 1000)), zmq.POLLOUT)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return {"error": f"{DEADLINE}, no reply from {self.endpoint} in time"}
            events = dict(self.poller.poll(max(1, int(left * 1000))))
            if self.sock in events:
                reply = self._receive(rid, lease)
                if reply is not None:
                    return reply
            if self.monitor in events:
                while self.monitor.poll(0):
                    if recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED:
                        return {"error": f"{UNAVAILABLE}, the connection to {self.endpoint} was lost before the "
                                         f"reply came"}

    def _receive(self, rid: int, lease: shm.Lease | None) -> Reply | None:
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            try:
                kind, header, buffers = unpack([f.buffer for f in frames])
            except Exception as exc:
                return {"error": f"{INTERNAL}, malformed reply from {self.endpoint}: {exc}"}
            got = header.get("id")
            if not isinstance(got, int):
                return {"error": f"{INTERNAL}, malformed reply from {self.endpoint}: no request id"}
            if got != rid:
                continue
            if self._expect is Kind.LOCAL:  # its answer, or an error from a Main that does not know LOCAL
                return header
            if kind is not Kind.RESULT:
                continue
            return _take_reply(header, buffers, lease, self.endpoint)

    def close(self) -> None:
        """Close now when no call runs; else the running call ends as it would (reply, deadline) and then
        closes it (a ZMQ socket must not be closed under the thread polling it)."""
        if not self.busy.acquire(blocking=False):
            self.closed = True
            return
        try:
            self.closed = True
            self.sock.disable_monitor()
            self.monitor.close(0)
            self.sock.close(0)
        finally:
            self.busy.release()


class _LocalSocket:
    """`Client.infer` over Main's unix socket for Clients on its host (`ZmqFrontend.start_local`): the calling
    thread writes and reads a blocking unix stream socket itself (`servable_framework.unixlink` framing, the same
    messages as over ZMQ), so no libzmq I/O thread sits on either side of a call. The same rules as
    `_SyncSocket`: the deadline, a lost connection and a malformed reply end the call at once; a reply with
    another request id is a late answer to an earlier call of this thread: dropped. A connection on which a call
    gave up midway (deadline) is closed: the next call connects again."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.pending = bytearray()  # bytes read past the message being parsed
        self.busy = threading.Lock()
        self.closed = False

    def connect(self, timeout_s: float) -> bool:
        """Connect (if not connected); False when Main's socket is not there any more."""
        if self.sock is not None:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.001, timeout_s))
        try:
            sock.connect(self.path)
            sock.sendall(b"".join(unixlink.encode([os.urandom(8).hex().encode()])))  # the identity message
        except OSError:
            sock.close()
            return False
        self.sock, self.pending = sock, bytearray()
        return True

    def call(self, rid: int, frames: list[Any], deadline: float, lease: shm.Lease | None = None) -> Reply:
        try:
            with self.busy:
                if self.closed or self.sock is None:
                    return {"error": f"{UNAVAILABLE}, the client was closed"}
                try:
                    return self._call(self.sock, rid, frames, deadline, lease)
                except TimeoutError:
                    self._drop()
                    return {"error": f"{DEADLINE}, no reply from {self.path} in time"}
                except OSError as exc:
                    self._drop()
                    return {"error": f"{UNAVAILABLE}, the connection to {self.path} was lost before the reply came "
                                     f"({exc})"}
        finally:
            if lease is not None:
                lease.finish(answered=False)  # a no-op when the reply came
            if self.closed:
                self.close()

    def _call(self, sock: socket.socket, rid: int, frames: list[Any], deadline: float,
              lease: shm.Lease | None) -> Reply:
        self._send(sock, [memoryview(f).cast("B") for f in unixlink.encode(frames)], deadline)
        while True:
            parts = self._message(sock, deadline)
            try:
                kind, header, buffers = unpack(parts)
            except Exception as exc:
                self._drop()
                return {"error": f"{INTERNAL}, malformed reply from {self.path}: {exc}"}
            if header.get("id") != rid or kind is not Kind.RESULT:
                continue
            return _take_reply(header, buffers, lease, self.path)

    def _message(self, sock: socket.socket, deadline: float) -> list[Any]:
        """One message: ``<u32 n> <u64 len>*n <frames>``."""
        (count,) = struct.unpack("<I", self._read(sock, 4, deadline))
        if not 1 <= count <= unixlink.MAX_FRAMES:
            raise OSError(f"bad frame count {count}")
        lengths = struct.unpack(f"<{count}Q", self._read(sock, 8 * count, deadline))
        if sum(lengths) > CLIENT_MAX_BYTES + (1 << 20):
            raise OSError(f"a reply of {sum(lengths)} bytes")
        return [self._read(sock, n, deadline) for n in lengths]

    def _read(self, sock: socket.socket, n: int, deadline: float) -> Any:
        """``n`` bytes: from what was read ahead, then from the socket (a large frame straight into its own
        buffer)."""
        if len(self.pending) >= n:
            out = bytes(self.pending[:n])
            del self.pending[:n]
            return out
        if n >= unixlink.DIRECT_BYTES:
            buf = bytearray(n)
            view = memoryview(buf)
            have = len(self.pending)
            view[:have] = self.pending
            self.pending = bytearray()
            while have < n:
                self._timeout(sock, deadline)
                got = sock.recv_into(view[have:])
                if not got:
                    raise OSError("connection closed")
                have += got
            return view.toreadonly()
        while len(self.pending) < n:
            self._timeout(sock, deadline)
            chunk = sock.recv(unixlink.STAGING_BYTES)
            if not chunk:
                raise OSError("connection closed")
            self.pending += chunk
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out

    def _send(self, sock: socket.socket, views: list[memoryview], deadline: float) -> None:
        """Write every byte of ``views`` (``sendmsg``: tensors are not copied into one buffer first)."""
        while views:
            self._timeout(sock, deadline)
            sent = sock.sendmsg(views[:512])  # IOV_MAX is 1024 on Linux
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]

    @staticmethod
    def _timeout(sock: socket.socket, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None

    def close(self) -> None:
        """As `_SyncSocket.close`: now when no call runs, else when the running call ends."""
        if not self.busy.acquire(blocking=False):
            self.closed = True
            return
        try:
            self.closed = True
            self._drop()
        finally:
            self.busy.release()


def _dealer(ctx: zmq.Context[Any], endpoint: str, keys: curve.CurveKeys | None) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection: a down server is noticed
    sock.setsockopt(zmq.MAXMSGSIZE, CLIENT_MAX_BYTES)
    if keys is not None:
        curve.secure_client(sock, keys)
    sock.connect(endpoint)
    return sock


class _Request(NamedTuple):
    rid: int
    frames: list[Any]
    lease: shm.Lease | None  # the call's shared-memory segment, finished when the call ends


def _local(endpoint: str) -> bool:
    """Whether a ZMQ endpoint is on this host: ``ipc://`` or a loopback TCP address."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class Client:
    """A client of one servable method over ZMQ.

    Args:
        address: ``"ip:port"`` or ``"unix:path"`` of `server.start_zmq_server`.
        servable_name, method_name: what to call; version_number: 0 = the newest running version.
        ssl_config: not supported (must be None).
        timeout_s: per-request deadline, sent to the server (which stops waiting then too). None: the
            servable's own deadline applies (its ``request_timeout_s``, else Main's, 100 s by default) and the
            client gives up locally after ``LOCAL_TIMEOUT_S``, so a call never blocks forever.
        connect_timeout_s: how long a request waits for a connection before failing as unavailable.
        keys_dir: a keys directory (`servable_framework.curve`; default ``$SERVABLE_KEYS_DIR``) holding the
            server's public key ``server.key`` and this client's ``client.key_secret``: the link is CurveZMQ,
            as a server bound off loopback requires. Without keys a call to such a server fails as unavailable
            after ``connect_timeout_s`` (the handshake never completes).
        shared_memory: pass tensors of 1 MiB and up through shared memory under ``/dev/shm`` instead of the
            socket (`servable_framework.shm`): the Workers read them in place and write large outputs back
            there, so a 64 MiB tensor is copied twice or three times instead of about eight times. None (default):
            when the server is on this host (a ``unix:`` address or a loopback one). A server that cannot take
            them (another host's or container's ``/dev/shm``, its setting ``shared_memory=False``) answers the
            first such call with an error; the Client then sends that call again inline and stops trying.
            Streaming calls always send inline. The Client's segments are removed on `close` (a killed client
            process leaves them in ``/dev/shm``, named ``sf-shm-*``).
    """

    LOCAL_TIMEOUT_S = 600.0
    SYNC_SOCKETS = 64  # threads that get their own socket for `infer`; calls of further threads go the I/O thread

    def __init__(self, address: str, servable_name: str, method_name: str, version_number: int = 0,
                 ssl_config: Any = None, *, timeout_s: float | None = None, connect_timeout_s: float = 3.0,
                 keys_dir: str | os.PathLike[str] | None = None, shared_memory: bool | None = None) -> None:
        checks.check_str("address", address)
        self.servable = checks.check_str("servable_name", servable_name)
        self.method = checks.check_str("method_name", method_name)
        self.version = checks.check_int("version_number", version_number, 0)
        if ssl_config is not None:
            raise RuntimeError("ssl_config is not supported by servable_framework yet")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        endpoint = transport.zmq_endpoint(address, "client").replace("tcp://*", "tcp://127.0.0.1")
        self._channel = _Channel(endpoint, connect_timeout_s, curve.resolve(keys_dir))
        if shared_memory is None:
            shared_memory = _local(endpoint)
        self._shm: shm.SegmentPool | None = shm.SegmentPool() if shared_memory and shm.available() else None
        if self._shm is not None:  # segments are removed at interpreter exit too, when close() was never called
            weakref.finalize(self, self._shm.close)
        self._local = threading.local()  # this thread's _SyncSocket (and _LocalSocket)
        self._sync: list[_SyncSocket] = []
        self._unix: list[_LocalSocket] = []
        # Main's unix socket for Clients on its host: asked for once (None: not yet; "": none, or not local)
        self._local_path: str | None = None if _local(endpoint) else ""
        self._sync_lock = threading.Lock()

    def _request(self, instances: Any, stream: bool, inline: bool = False) -> _Request | str:
        """One request (its id, frames and shared-memory lease), or the error text when it is over the client's
        size limit. Tensors go to shared memory unless ``inline``, streaming, or shared memory is off."""
        buffers: list[Any] = []
        items = _instances(instances)
        rid = next(_Channel._ids)
        pool = None if inline or stream else self._shm
        big = 0 if pool is None else sum(shm.aligned(v.nbytes) for inst in items for v in inst.values()
                                         if isinstance(v, np.ndarray) and v.nbytes >= shm.MIN_BYTES)
        size = big
        if size > CLIENT_MAX_BYTES:
            return f"{RESOURCE_EXHAUSTED}, request of {size} bytes is over the client limit"
        # the reply space: as many bytes as the large inputs (an output as large as the inputs fits)
        lease = pool.lease(big, big) if pool is not None and big else None
        place = None if lease is None else lease.put
        encoded = [{k: encode_value(v, buffers, place) for k, v in inst.items()} for inst in items]
        header: dict[str, Any] = {"id": rid, "servable": self.servable, "method": self.method,
                                  "version": self.version, "instances": encoded}
        if lease is not None:
            header["shm_out"] = lease.space().header()
        if self.timeout_s is not None:
            header["timeout_s"] = self.timeout_s
        if stream:
            header["stream"] = True
        size += sum(len(memoryview(b)) for b in buffers)
        if size > CLIENT_MAX_BYTES:
            if lease is not None:
                lease.finish(answered=True)  # never sent: reusable
            return f"{RESOURCE_EXHAUSTED}, request of {size} bytes is over the client limit"
        return _Request(rid, pack(Kind.PREDICT, header, buffers), lease)

    def _no_shared_memory(self) -> None:
        """The server refused this client's shared memory: from now on every tensor goes inline."""
        pool, self._shm = self._shm, None
        if pool is not None:
            log.info("the server cannot take shared-memory tensors from this client: sending them inline")
            pool.close()

    def _deadline(self) -> float:
        return time.monotonic() + (self.timeout_s + 1.0 if self.timeout_s is not None else self.LOCAL_TIMEOUT_S)

    def infer_async(self, instances: Any) -> Future[Reply]:
        """Send without waiting; ``.result()`` on the returned future gives what `infer` returns."""
        fut: Future[Reply] = Future()
        self._submit(instances, fut, inline=False)
        return fut

    def _submit(self, instances: Any, fut: Future[Reply], inline: bool) -> None:
        if self._channel.closed:
            fut.set_result({"error": f"{UNAVAILABLE}, the client was closed"})
            return
        request = self._request(instances, stream=False, inline=inline)
        if isinstance(request, str):
            fut.set_result({"error": request})
            return
        retry = None
        if request.lease is not None:
            def retry() -> None:  # on the I/O thread: the server refused shared memory
                self._no_shared_memory()
                self._submit(instances, fut, inline=True)
        self._channel.submit(request.rid, request.frames, _FutureWaiter(fut, request.lease, retry), self._deadline())

    def infer_stream(self, instances: Any) -> Iterator[dict[str, Any]]:
        """Run ``instances`` (as `infer`) on a method declared ``stream=True``, yielding pieces as they come:
        ``{"index": i, <output>: <new part>, ..., "finish_reason": None}``, where the new part of a str output
        is the text added since the last piece (joined, the pieces of an output equal `infer`'s output), then,
        as each instance's last piece, the same with ``"finish_reason"`` set (``"eos"``, ``"length"``,
        ``"stop"``, ``"cancelled"``, or ``"done"`` when the model did not say). The iteration ends after the
        last piece of every instance.

        Raises:
            StreamError: at once when the whole request fails (also midway: the pieces already yielded stand),
                including a method that does not stream, an unreachable server and ``timeout_s`` (for the whole
                stream); at the end when some instances failed (``errors``; the others' pieces were yielded).

        Leaving the loop early (``break``, closing the generator) tells the server to cancel the request.
        """
        request = self._request(instances, stream=True)
        if isinstance(request, str):
            raise StreamError(request)
        rid, frames = request.rid, request.frames
        waiter = _StreamWaiter()
        self._channel.submit(rid, frames, waiter, self._deadline())
        done = False
        errors: dict[int, str] = {}
        try:
            while True:
                item = waiter.items.get()
                if item is _END:
                    done = True
                    if errors:
                        raise StreamError(errors[min(errors)], errors)
                    return
                if isinstance(item, StreamError):
                    done = True
                    raise item
                if "error" in item:
                    errors[item["index"]] = item["error"]
                    continue
                yield item
        finally:
            if not done and not self._channel.closed:  # the caller stopped early: cancel it on the server
                self._channel.submit(rid, pack(Kind.CANCEL, {"id": rid}), None, 0.0)

    def infer(self, instances: Any) -> Reply:
        """Run ``instances`` (one dict or a list of dicts: input name -> numpy array / str / bytes / scalar).

        Runs on the calling thread's own socket (`_SyncSocket`; the first `SYNC_SOCKETS` threads that call it),
        else through the Client's I/O thread as `infer_async` does; the answers are the same."""
        sync = self._sync_socket()
        if sync is None:
            return self.infer_async(instances).result()
        request = self._request(instances, stream=False)
        if isinstance(request, str):
            return {"error": request}
        reply = self._call(sync, request)
        if request.lease is None or not _refused(reply):
            return reply
        self._no_shared_memory()
        request = self._request(instances, stream=False, inline=True)
        if isinstance(request, str):
            return {"error": request}
        return self._call(sync, request)

    def _call(self, sync: _SyncSocket, request: _Request) -> Reply:
        """One call on this thread: over Main's unix socket when Main is on this host, else (or when that socket
        cannot be reached: Main restarted, so it is asked again next time) over ZMQ."""
        deadline = self._deadline()
        unix = self._unix_socket(sync, deadline)
        if unix is not None:
            return unix.call(request.rid, request.frames, deadline, request.lease)
        return sync.call(request.rid, request.frames, deadline, self.connect_timeout_s, request.lease)

    def _unix_socket(self, sync: _SyncSocket, deadline: float) -> _LocalSocket | None:
        if self._local_path is None:
            self._local_path = sync.ask_local(next(_Channel._ids), min(deadline, time.monotonic() + 10.0),
                                              self.connect_timeout_s) or ""
        path = self._local_path
        if not path:
            return None
        unix: _LocalSocket | None = getattr(self._local, "unix", None)
        if unix is None or unix.path != path:
            unix = _LocalSocket(path)
            with self._sync_lock:
                self._unix.append(unix)
            self._local.unix = unix
        if unix.connect(self.connect_timeout_s):
            return unix
        self._local_path = None  # gone (Main restarted elsewhere?): ask again on the next call
        return None

    def _sync_socket(self) -> _SyncSocket | None:
        if self._channel.closed:
            return None
        sync: _SyncSocket | None = getattr(self._local, "sync", None)
        if sync is not None:
            return sync
        with self._sync_lock:
            if len(self._sync) >= self.SYNC_SOCKETS:
                return None
            sync = _SyncSocket(self._channel.endpoint, self._channel.keys)
            self._sync.append(sync)
        self._local.sync = sync
        return sync

    def close(self) -> None:
        """Stop the I/O thread and close every socket; later calls answer ``unavailable``. A call in flight on
        another thread's own socket ends as it would (reply or deadline), then that socket is closed."""
        self._channel.close()
        with self._sync_lock:
            sockets, self._sync = self._sync, []
            unix, self._unix = self._unix, []
        for sync in sockets:
            sync.close()
        for conn in unix:
            conn.close()
        if self._shm is not None:
            self._shm.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._channel.closed:
                self.close()
        except Exception:
            pass
