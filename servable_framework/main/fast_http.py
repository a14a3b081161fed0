"""Main's HTTP protocol: uvicorn's httptools protocol, with MindSpore's predict answered right from the parser.

uvicorn turns every request into an ASGI cycle: a scope, a cycle object with an event, a task running the app
through its middleware, ``receive``/``send`` messages, a Starlette ``Response`` and a watcher task for the
client's hang-up. For the one route whose speed users compare (``POST /model/...``, MindSpore's predict), that
machinery cost Main more CPU than the request itself. `ServingHttpProtocol` answers such a request from the
parser's callbacks instead: the body is gathered as it arrives, one task runs `PredictPath.respond` (the same
code, checks, texts and metrics as the ASGI route) and the answer is written as one buffer. A hang-up cancels
that task, as the ASGI route's watcher would.

Answered here only when every condition below holds; any other request takes uvicorn's way unchanged (so the
app, its middleware and its 401/413/SSE answers see it): HTTP/1.1, ``POST``, a plain ``/model/...`` path
(`PredictPath.takes`, no ``%`` escape, no root path), a ``Content-Length`` within the body limit and no
``Transfer-Encoding``, no ``Expect: 100-continue``, no upgrade, no ``text/event-stream`` in ``Accept``, a valid
API key when keys are configured, no access log, no concurrency limit, and nothing else in flight on the
connection. A pipelined request that arrives while one is answered here waits in uvicorn's own queue.

Main uses it unless ``SERVABLE_HTTP_DIRECT=0`` (`Settings.http_direct`); with a uvicorn that lacks a part it
uses (`_UVICORN_PARTS`), it logs that once and leaves every request to uvicorn. `servable_http_direct_requests_total`
counts the requests answered here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from servable_framework.main.rest import PredictPath

log = logging.getLogger("servable_framework.rest")


class _Busy:
    """Stands in for uvicorn's current cycle while a request is answered here, so that uvicorn queues a
    pipelined request behind it (it starts one only when the current cycle's response is complete)."""

    response_complete = False


_BUSY = _Busy()


class _Hot:
    """One request answered by `ServingHttpProtocol`."""

    __slots__ = ("path", "timeout_raw", "keep_alive", "body", "task", "left")

    def __init__(self, path: str, timeout_raw: bytes | None, keep_alive: bool) -> None:
        self.path = path
        self.timeout_raw = timeout_raw
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.left = False  # the client hung up


def find_predict_path(app: Any) -> PredictPath | None:
    """The `PredictPath` at the front of Main's app, under uvicorn's wrappers (None: another app)."""
    for _ in range(8):
        if isinstance(app, PredictPath):
            return app
        app = getattr(app, "app", None)
    return None


# what this class uses of uvicorn's protocol beyond its public callbacks: uvicorn's own names (0.29 to 0.54)
_UVICORN_PARTS = ("parser", "headers", "cycle", "pipeline", "flow", "tasks", "server_state", "transport", "loop",
                  "expect_100_continue", "on_response_complete")
_fits: bool | None = None  # whether this uvicorn's protocol has them all: found at the first connection


def _uvicorn_fits(protocol: HttpToolsProtocol) -> bool:
    """Whether this uvicorn's protocol has every part `ServingHttpProtocol` uses (looked at once, on the first
    connection: the attributes are set in ``__init__``); if not (a release that renamed one), every request takes
    uvicorn's own way, and that is logged once."""
    global _fits
    if _fits is None:
        missing = [name for name in _UVICORN_PARTS if not hasattr(protocol, name)]
        _fits = not missing
        if missing:
            log.warning("this uvicorn's HTTP protocol lacks %s: MindSpore predicts take the ASGI route (same "
                        "answers, more CPU per request); set SERVABLE_HTTP_DIRECT=0 to silence this",
                        ", ".join(missing))
    return _fits


class ServingHttpProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` answering MindSpore's predict itself (module docstring). Plain uvicorn
    for an app without `PredictPath` at its front."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fast = find_predict_path(self.app)
        self.fast = fast if fast is not None and not self.access_log and self.limit_concurrency is None \
            and not self.root_path and _uvicorn_fits(self) else None
        self.hot: _Hot | None = None  # the request answered here, from its headers to its answer's write
        self.reading_hot = False  # the parser is in that request's body

    # -- the parser's callbacks -------------------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        if self.hot is not None:  # pipelined behind one answered here: uvicorn queues it
            previous, self.cycle = self.cycle, _BUSY  # type: ignore[assignment]
            super().on_headers_complete()
            if self.cycle is _BUSY:  # it made no cycle (an upgrade): the stand-in must not stay
                self.cycle = previous
            return
        if self.fast is not None and (self.cycle is None or self.cycle.response_complete):
            hot = self._classify(self.fast)
            if hot is not None:
                self.hot, self.reading_hot = hot, True
                return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.reading_hot:
            assert self.hot is not None
            self.hot.body += body
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self.reading_hot:
            super().on_message_complete()
            return
        self.reading_hot = False
        hot = self.hot
        assert hot is not None
        hot.task = task = self.loop.create_task(self._answer(hot))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)  # a graceful shutdown waits for it

    def _classify(self, fast: PredictPath) -> _Hot | None:
        """A `_Hot` for the request whose headers were just parsed, when it is answered here (module docstring):
        what `PredictPath` itself would answer (`PredictPath.takes`), framed in a way this class reads alone."""
        parser = self.parser
        if parser.get_http_version() != "1.1" or self.expect_100_continue or parser.should_upgrade():
            return None
        url = self.url
        query = url.find(b"?")
        raw_path = url if query < 0 else url[:query]
        if b"%" in raw_path or b"#" in raw_path:  # escapes: uvicorn's decoding decides the path
            return None
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            return None
        plain = fast.takes(parser.get_method(), path, self.headers)
        if plain is None or plain.chunked:
            return None
        declared = plain.content_length
        if declared is None or not declared.isdigit() or int(declared) > fast.max_msg_bytes:
            return None  # (no length, or too large: the ASGI route answers, 413 for the latter)
        return _Hot(path, plain.timeout, parser.should_keep_alive())

    # -- the answer ----------------------------------------------------------------------------------------
    async def _answer(self, hot: _Hot) -> None:
        assert self.fast is not None
        self.fast.dispatcher.metrics.direct_http.inc()
        try:
            response = await self.fast.respond(hot.path, bytes(hot.body), hot.timeout_raw)
            if self.flow.write_paused and not self.transport.is_closing():  # not reading: wait, as uvicorn does
                await self.flow.drain()
        except asyncio.CancelledError:
            self.hot = None
            if not hot.left:
                raise
            log.info("client of %s went away: request cancelled", hot.path)
            return
        self.hot = None  # (only now: a request pipelined behind this one waits in uvicorn's queue until here)
        if self.transport.is_closing():
            return
        content: list[bytes | memoryview] = [STATUS_LINE[response.status_code]]
        for name, value in (*self.server_state.default_headers, *response.raw_headers):
            content += (name, b": ", value, b"\r\n")
        if not hot.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", response.body)
        self.transport.write(b"".join(content))
        if not hot.keep_alive:
            self.transport.close()
        self.on_response_complete()  # uvicorn's: the next pipelined request, or the keep-alive timer

    # -- the connection ------------------------------------------------------------------------------------
    def connection_lost(self, exc: Exception | None) -> None:
        hot = self.hot
        if hot is not None and hot.task is not None and not hot.task.done():
            hot.left = True
            hot.task.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self.hot is not None:  # answer it, then close
            self.hot.keep_alive = False
        else:
            super().shutdown()
