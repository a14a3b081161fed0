"""The ZMQ front end (gRPC's place): a ROUTER socket feeding the same `Dispatcher` as REST.

Request: ``[client-id, PREDICT, header, buf...]`` with header ``{"id", "servable", "method", "version",
"instances": [{input: descriptor}], "timeout_s"?, "shm_out"?}`` (descriptors: `servable_framework.wire`; a
co-located Client's large tensors may be shared-memory references, passed on to the Worker untouched, and
``shm_out`` the reply space it offers for large outputs: `servable_framework.shm`).
Reply: ``[client-id, RESULT, header, buf...]`` with ``{"id", "instances": [...], "error_msg": [...]}`` and
MindSpore's three-way error semantics (contract §9): an empty list = all ok; one entry and no instances =
the whole request failed; otherwise one entry per instance, ``code`` 0 = that instance is ok.
Malformed or oversize messages get an error reply (when they carry a client id) and change nothing else.

Streaming (``"stream": true`` in the request, a method declared ``stream=True``): STREAM messages
``{"id", "pieces": [{"index", "outputs": {name: descriptor}, "finish": reason | None} | {"index", "error":
{"code", "kind", "msg"}}]}`` as pieces come (see `Dispatcher.predict_stream`), then one RESULT ``{"id",
"error_msg": []}`` when every instance has had its last piece, or ``{"id", "error_msg": [entry]}`` when the
whole request failed. ``[client-id, CANCEL, {"id"}]`` from the client stops its stream (no reply).

Forwarding: a PREDICT that is not streaming and carries no shared-memory tensor goes to its endpoint's Worker
undecoded when that endpoint has one READY Worker (`Dispatcher.predict_zmq`): the Worker decodes, checks and runs
it and renders the RESULT (`wire.encode_reply`), Main puts the request id back on and relays it; the same answers
and metrics as decoding it here (setting ``forward_requests`` off does that for every request). The local Client's
c=1 round trip, interleaved A/B: 0.71-0.77 -> 0.65-0.69 ms.

Local Clients: ``[client-id, LOCAL, {"id"}]`` is answered with ``{"id", "path"}``, the unix socket of the same
front end for Clients on this host (`ZmqFrontend.start_local`, `servable_framework.unixlink` framing; None when
there is none). Over it the same messages get the same answers, without libzmq's I/O threads in between (c=1
round trip 1.18-1.42 -> 0.89-1.12 ms on the 2-core VM, interleaved).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from servable_framework import curve, shm, transport, unixlink
from servable_framework.errors import InvalidInput, PayloadTooLarge, ServingError
from servable_framework.main.dispatcher import Dispatcher, Result
from servable_framework.shm import ShmTensor
from servable_framework.wire import (
    Instance,
    Kind,
    ShmReader,
    decode_instances,
    encode_reply,
    encode_value,
    error_entry,
    unpack,
)

log = logging.getLogger("servable_framework.zmq")

HARD_MAX_BYTES = 513 * 1024 * 1024
Reply = Callable[[Kind, dict[str, Any], list[Any]], None]  # sends one answer to the client a message came from


class ZmqFrontend:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, dispatcher: Dispatcher, max_msg_bytes: int,
                 keys: curve.CurveKeys | None = None) -> None:
        """Bind ``address``; with ``keys`` only Clients holding an authorized key get through (CurveZMQ), and
        without them only a loopback or ``unix:`` address may be bound (`curve.require_keys`). Runs on Main's
        event loop."""
        curve.require_keys(address, keys, "The ZMQ front end", "Serving gRPC")
        self.dispatcher = dispatcher
        self.max_msg_bytes = max_msg_bytes
        # Main keeps a co-located Client's shared-memory tensors as references for the Worker (None: refused)
        self._shm_reader: ShmReader | None = shm.keep_reference if dispatcher.settings.shared_memory else None
        # libzmq drops a connection (silently) whose message exceeds MAXMSGSIZE, so it is set to the largest
        # limit a server may have (512 MB, the client's limit too) plus slack for the header: anything up to
        # that gets a proper "resource exhausted" reply from the size check in `_handle`.
        self.sock = transport.async_socket(ctx, zmq.ROUTER, max_msg_bytes=HARD_MAX_BYTES)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a client that left just loses its reply
        # the data plane: sent and received straight from the loop (`transport.LoopSocket`); the asyncio socket
        # keeps the options, the CURVE handshake monitor and the closing
        self.io = transport.LoopSocket(self.sock, self._on_frames)
        self._pending: set[asyncio.Task[None]] = set()
        self.local: unixlink.LinkServer | None = None  # the local Clients' unix socket (`start_local`)
        self.local_path: str | None = None
        self._streams: dict[tuple[bytes, Any], asyncio.Task[Any]] = {}  # (client, request id) -> its task
        self.zap: curve.ZapHandler | None = None
        self._watch: asyncio.Task[None] | None = None
        if keys is not None:
            self.zap = curve.ZapHandler(ctx, keys)
            curve.secure_server(self.sock, keys)
            self._watch = curve.watch_handshakes(self.sock, "the ZMQ front end")
        try:
            self.sock.bind(transport.zmq_endpoint(address, "Serving gRPC"))
        except zmq.ZMQError:
            self.close()  # the ZAP handler's endpoint too: a retry in this process must be able to bind it
            raise

    def run(self) -> None:
        self.io.start()

    async def start_local(self, folder: str) -> None:
        """Also serve Clients on this host over a unix socket in ``folder`` (Main's private 0700 folder):
        `Client.infer` asks for its path once (a LOCAL message) and then calls over it, through no ZMQ I/O
        thread on either side (`servable_framework.unixlink`). Same messages, checks and answers as over ZMQ;
        file permissions (this user only) stand in for CurveZMQ there."""
        path = os.path.join(folder, "clients")
        local = unixlink.LinkServer(path, self._on_local, max_bytes=HARD_MAX_BYTES)
        await local.start()
        self.local, self.local_path = local, path

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        client = bytes(frames[0].buffer)
        self._spawn(client, [f.buffer for f in frames[1:]],
                    lambda kind, header, buffers: self.io.send(kind, header, buffers, to=client))

    def _on_local(self, identity: bytes, frames: list[Any]) -> None:
        def reply(kind: Kind, header: dict[str, Any], buffers: list[Any]) -> None:
            assert self.local is not None
            self.local.send(kind, header, buffers, to=identity)

        self._spawn(b"unix:" + identity, frames, reply)

    def _spawn(self, client: bytes, parts: list[Any], reply: Reply) -> None:
        task = self.dispatcher.loop().create_task(self._handle(client, parts, reply))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _handle(self, client: bytes, parts: list[Any], reply: Reply) -> None:
        """One message ``[kind, header, buf...]`` from ``client``; every answer goes through ``reply``."""
        request_id: Any = None
        try:
            size = sum(len(p) for p in parts)
            # the header is small and parsed even for an oversize message, so its reply carries the request id
            kind, header, buffers = unpack(parts)
            request_id = header.get("id")
            if size > self.max_msg_bytes:
                raise PayloadTooLarge(f"resource exhausted: message size {size} is bigger than {self.max_msg_bytes}")
            if kind is Kind.CANCEL:
                task = self._streams.get((client, request_id))
                if task is not None:
                    task.cancel()
                return
            if kind is Kind.LOCAL:
                self._reply(reply, {"id": request_id, "path": self.local_path}, [], Kind.LOCAL)
                return
            if kind is not Kind.PREDICT:
                raise InvalidInput(f"unexpected message kind {kind.name}")
            servable, method, version = header.get("servable"), header.get("method"), header.get("version", 0)
            if not isinstance(servable, str) or not servable or not isinstance(method, str) or not method:
                raise InvalidInput("request must name a servable and a method")
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise InvalidInput(f"invalid version number {version!r}")
            timeout = header.get("timeout_s")
            if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
                raise InvalidInput(f"invalid timeout_s {timeout!r}")
            if header.get("stream") is not True and "shm_out" not in header:  # passed on to the Worker as it came
                forwarded = await self.dispatcher.predict_zmq(servable, method, version, header.get("instances"),
                                                              buffers, timeout)
                if forwarded is not None:
                    answer, out = forwarded
                    self._reply(reply, {"id": request_id, **answer}, out)
                    return
            instances = decode_instances(header.get("instances"), buffers, self._shm_reader)
            # shared-memory tensors pass through as references; they count towards the size limit as if they
            # were in the message (the limit means the same for every client)
            size += sum(v.nbytes for inst in instances for v in inst.values() if isinstance(v, ShmTensor))
            if size > self.max_msg_bytes:
                raise PayloadTooLarge(f"resource exhausted: message size {size} is bigger than {self.max_msg_bytes}")
            if header.get("stream") is True:
                await self._stream(client, reply, request_id, servable, method, version, instances, timeout)
                return
            space = shm.parse_space(header.get("shm_out")) if self._shm_reader is not None else None
            results = await self.dispatcher.predict(servable, method, version, instances, timeout, protocol="zmq",
                                                    reply_space=space)
        except ServingError as exc:
            self._reply(reply, {"id": request_id, "error_msg": [error_entry(exc)]}, [])
            return
        except Exception as exc:  # never let one request take the front end down
            log.exception("unexpected error in the ZMQ front end")
            self._reply(reply, {"id": request_id, "error_msg": [error_entry(ServingError(str(exc)))]}, [])
            return
        header_out, buffers_out = encode_results(request_id, results)
        self._reply(reply, header_out, buffers_out)

    async def _stream(self, client: bytes, reply: Reply, request_id: Any, servable: str, method: str, version: int,
                      instances: list[Instance], timeout: float | None) -> None:
        """Relay the pieces of one streaming request; errors of the whole request propagate to `_handle`."""
        key = (client, request_id)
        task = asyncio.current_task()
        if task is not None:
            self._streams[key] = task
        try:
            async for piece in self.dispatcher.predict_stream(servable, method, version, instances, timeout,
                                                              protocol="zmq"):
                buffers: list[Any] = []
                item: dict[str, Any] = {"index": piece.index}
                try:
                    if piece.error is not None:
                        raise piece.error
                    item["outputs"] = {k: encode_value(v, buffers) for k, v in piece.outputs.items()}
                    item["finish"] = piece.finish
                except ServingError as exc:
                    item = {"index": piece.index, "error": error_entry(exc)}
                    buffers = []
                self._reply(reply, {"id": request_id, "pieces": [item]}, buffers, Kind.STREAM)
        finally:
            self._streams.pop(key, None)
        self._reply(reply, {"id": request_id, "error_msg": []}, [])

    @staticmethod
    def _reply(reply: Reply, header: dict[str, Any], buffers: list[Any], kind: Kind = Kind.RESULT) -> None:
        try:
            reply(kind, header, buffers)
        except (zmq.ZMQError, unixlink.LinkError) as exc:
            log.warning("could not answer a ZMQ client: %s", exc)

    def close(self) -> None:
        self.io.stop()
        if self.local is not None:
            self.local.stop()
        for task in self._pending:
            task.cancel()
        if self._watch is not None:
            self._watch.cancel()
        if self.zap is not None:
            self.zap.close()
        self.sock.close(0)


def encode_results(request_id: Any, results: list[Result]) -> tuple[dict[str, Any], list[Any]]:
    """The RESULT of request ``request_id`` (`wire.encode_reply`)."""
    header, buffers = encode_reply(results)
    return {"id": request_id, **header}, buffers
