"""HTTP plumbing shared by Main's REST protocols (MindSpore's, OpenAI's, KServe's): body reading with a size
limit, the request-deadline header, Server-Sent Events, and cancelling a request whose client hung up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from servable_framework import transport
from servable_framework.errors import ClientClosedRequest, InvalidInput, PayloadTooLarge

log = logging.getLogger("servable_framework.rest")

TIMEOUT_HEADER = "x-request-timeout-s"
EVENT_STREAM = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T")

# uvicorn's settings for Main's REST server, shared with the benchmark's bare baseline app (bench/bench_add.py
# runs it with exactly these): one process, no access log, keep-alive connections held for 100 s.
UVICORN_OPTIONS: dict[str, Any] = {"loop": "uvloop", "http": "httptools", "log_level": "warning", "access_log": False,
                                   "timeout_keep_alive": 100}


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the kind ``UVICORN_OPTIONS["loop"]`` names (Main creates its loop itself)."""
    if UVICORN_OPTIONS["loop"] == "uvloop":
        return transport.new_event_loop()
    return asyncio.new_event_loop()


class EventStream(StreamingResponse):
    """A StreamingResponse that always closes its iterator, also when the client hung up mid-stream (Starlette
    cancels the sending task then), so the request is cancelled at once rather than when it is collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse(data: dict[str, Any], event: str | None = None) -> bytes:
    """One Server-Sent Event: an optional ``event:`` line, one ``data:`` line of JSON, a blank line."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + b"data: " + text.encode() + b"\n\n"


async def unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``; if the client hangs up first, cancel it (the dispatcher then cancels the request in the
    Worker and on the Agents: a generation nobody will read stops) and raise `ClientClosedRequest`."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("client of %s went away: request cancelled", request.url.path)
        raise ClientClosedRequest("the client closed the connection before the answer")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the ASGI server reports the client gone (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """`read_limited` straight from ASGI ``receive`` (``declared``: the Content-Length header's text). A client
    that hangs up meanwhile raises `ClientClosedRequest`."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"http message is bigger than {limit}")
    message = await receive()
    body = message.get("body", b"")
    if message["type"] == "http.request" and not message.get("more_body", False):  # the usual case: one piece
        if len(body) > limit:
            raise PayloadTooLarge(f"http message is bigger than {limit}")
        return bytes(body)
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            raise ClientClosedRequest("the client closed the connection before the answer")
        size += len(body)
        if size > limit:
            raise PayloadTooLarge(f"http message is bigger than {limit}")
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()
        body = message.get("body", b"")


async def until_disconnect(receive: Receive, work: Coroutine[Any, Any, T], what: str) -> T:
    """`unless_client_leaves` for a raw ASGI handler, in the calling task: ``work`` runs here and a watcher
    task cancels this task when the client hangs up (one task per request instead of two and a wait)."""
    me = asyncio.current_task()
    assert me is not None
    left = finished = False

    def on_left(watch: asyncio.Future[Any]) -> None:
        nonlocal left
        if not finished and not watch.cancelled() and watch.exception() is None:
            left = True
            me.cancel()

    watch = asyncio.ensure_future(_disconnected_raw(receive))
    watch.add_done_callback(on_left)
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise
        if hasattr(me, "uncancel"):  # Python 3.11+: this cancellation is handled here
            me.uncancel()
        log.info("client of %s went away: request cancelled", what)
        raise ClientClosedRequest("the client closed the connection before the answer") from None
    finally:
        finished = True  # a hang-up noticed from now on must not cancel the answer's sending
        watch.remove_done_callback(on_left)
        watch.cancel()


async def _disconnected_raw(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def read_limited(request: Request, limit: int) -> bytes:
    """Read the body, refusing (413) as soon as it exceeds ``limit`` bytes, declared or actual."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"http message is bigger than {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"http message is bigger than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def request_timeout(request: Request) -> float | None:
    """The deadline the client asked for in the ``X-Request-Timeout-S`` header (None: the server's default)."""
    return parse_timeout(request.headers.get(TIMEOUT_HEADER))


def parse_timeout(raw: str | None) -> float | None:
    """`request_timeout` of the header's raw text (None: no header)."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise InvalidInput(f"header {TIMEOUT_HEADER} must be a positive number of seconds, got {raw!r}")
    return value
