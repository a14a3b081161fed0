"""The REST front end: a Starlette app over the `Dispatcher`.

Routes: ``POST /model/{servable}[/version/{n}]:{method}`` (MindSpore's URL and JSON body), ``GET /health``
(alive; 503 naming the servable once one has no Worker left and its restart budget is spent), ``GET /ready``
(every servable has a READY Worker; 503 otherwise), ``GET /metrics`` (Prometheus text,
`servable_framework.main.metrics`), the OpenAI and KServe v2 routes. With API keys configured, every route
but ``/health`` and ``/ready`` needs ``Authorization: Bearer <key>`` (`servable_framework.main.auth`).
Errors become ``{"error_msg": ...}`` with a meaningful HTTP status in exactly one place, `_error_response`;
per-instance errors keep HTTP 200, as the other instances succeeded.

Streaming (a method declared ``stream=True``, asked with ``Accept: text/event-stream``): Server-Sent Events,
one per piece, once the first piece with outputs is there; a request that fails before it is answered exactly
as the non-streaming form would be (status code and body). Events (``data:`` is one line of JSON)::

    data: {"index": 0, "text": "Hel", "finish_reason": null}        the new part of every output of instance 0
    data: {"index": 0, "text": "lo", "finish_reason": "length"}     its last piece: eos|length|stop|cancelled|done
    event: error
    data: {"index": 1, "error_msg": "..."}                          instance 1 failed (its last event)
    event: error
    data: {"error_msg": "..."}                                      the whole request failed: the stream ends

The response ends after the last event of every instance. A client that hangs up cancels the request.

Hot path: a plain ``POST /model/...`` (no event stream asked for, a path of plain printable ASCII) is answered by
`PredictPath`, a raw ASGI handler in front of Starlette, with the same steps, checks, texts and statuses as the
``predict`` route, without routing, middleware and a ``Request`` per call; every other request (and one whose API
key is missing or wrong: the middleware answers it) goes through Starlette.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from servable_framework.errors import (
    InvalidInput,
    MethodNotAllowed,
    Overloaded,
    ServingError,
)
from servable_framework.main import auth, kserve, openai_api
from servable_framework.main.dispatcher import Dispatcher, Result, StreamPiece
from servable_framework.main.http import (
    EVENT_STREAM,
    SSE_HEADERS,
    TIMEOUT_HEADER,
    EventStream,
    parse_timeout,
    read_body,
    read_limited,
    request_timeout,
    sse,
    unless_client_leaves,
    until_disconnect,
)
from servable_framework.main.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from servable_framework.main.rest_codec import encode_error, encode_outputs, parse_body, parse_url, render_results

log = logging.getLogger("servable_framework.rest")
JSON = "application/json"



def _error_response(exc: ServingError) -> Response:
    headers = {"Retry-After": "1"} if isinstance(exc, Overloaded) else None
    return JSONResponse(encode_error(exc), status_code=exc.http_status, headers=headers)


def _bug_response(path: str, exc: Exception) -> Response:
    """A bug: logged, answered 500 in the contract's shape; the server keeps serving."""
    log.exception("unexpected error on %s", path, exc_info=exc)
    return _error_response(ServingError(f"Serving Error: internal error: {type(exc).__name__}"))


def _results_response(results: list[Result]) -> Response:
    status, body = render_results(results)
    return Response(body, status_code=status, media_type=JSON)


def build_app(dispatcher: Dispatcher, max_msg_bytes: int, api_keys: auth.ApiKeys | None = None) -> ASGIApp:
    """Main's REST app (`PredictPath` in front of Starlette). ``api_keys``: as loaded by `auth.load_keys`
    (default: from the dispatcher's settings)."""
    keys = auth.load_keys(dispatcher.settings) if api_keys is None else api_keys

    async def predict(request: Request) -> Response:
        try:
            if request.method != "POST":
                raise MethodNotAllowed("http message only support POST right now")
            target = parse_url(request.url.path)
            body = await read_limited(request, max_msg_bytes)
            instances = parse_body(body)
            timeout = request_timeout(request)
            if EVENT_STREAM in request.headers.get("accept", "").lower():
                stream = dispatcher.predict_stream(target.servable, target.method, target.version, instances,
                                                   timeout, protocol="rest")
                return await _stream_response(request, stream, len(instances))
            results = await unless_client_leaves(
                request, dispatcher.predict(target.servable, target.method, target.version, instances, timeout,
                                            protocol="rest"))
        except ServingError as exc:
            return _error_response(exc)
        except Exception as exc:  # a bug: log it, answer 500 in the contract's shape, keep serving
            log.exception("unexpected error on %s", request.url.path)
            return _error_response(ServingError(f"Serving Error: internal error: {type(exc).__name__}"))
        return _results_response(results)

    async def health(_: Request) -> Response:
        # unhealthy once an endpoint has no Worker left and no restart to come: an orchestrator's liveness
        # probe then replaces this Main (which itself keeps running, so /ready, /metrics and logs stay readable)
        lost = dispatcher.workers.lost()
        if lost:
            return JSONResponse({"status": "unhealthy", "error_msg": "; ".join(lost)}, status_code=503)
        return JSONResponse({"status": "alive"})

    async def ready(_: Request) -> Response:
        servables = dispatcher.ready()
        # a draining Main is not ready: load balancers stop sending while in-flight requests finish
        ok = bool(servables) and all(s["ready"] for s in servables.values()) and not dispatcher.draining
        return JSONResponse({"ready": ok, "draining": dispatcher.draining, "servables": servables},
                            status_code=200 if ok else 503)

    async def metrics(_: Request) -> Response:
        return Response(dispatcher.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        # the protocols clients already speak, next to MindSpore's (whose catch-all route comes last)
        *openai_api.routes(dispatcher, max_msg_bytes),
        *kserve.routes(dispatcher, max_msg_bytes),
        Route("/{path:path}", predict, methods=methods),
    ]
    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own 404/405 (paths no route matches, e.g. with a newline) in the contract's body shape."""
        status = getattr(exc, "status_code", 500)
        text = "please check url, the keyword:[model] must contain." if status == 404 else str(exc)
        return JSONResponse({"error_msg": text}, status_code=status)

    app = Starlette(routes=routes, exception_handlers={404: http_error, 405: http_error},
                    middleware=[Middleware(auth.ApiKeyMiddleware, keys=keys)] if keys else None)
    return PredictPath(app, dispatcher, max_msg_bytes, keys)


# a path whose ``request.url.path`` in Starlette is the ASGI path itself: printable ASCII without space and
# ``?#\\`` (Starlette escapes those; a URL parser drops tabs and newlines)
_PLAIN = re.compile(r"/model/[^\x00-\x20?#\\\x7f-\U0010ffff]*")
_WANTED = {b"content-length": 0, b"accept": 1, TIMEOUT_HEADER.encode(): 2, b"transfer-encoding": 3}
_EVENT_STREAM = EVENT_STREAM.encode()


class PlainPredict(NamedTuple):
    """What `PredictPath` needs of a request's headers (raw values of the first of each, as Starlette reads
    them)."""

    content_length: bytes | None
    timeout: bytes | None  # the deadline header
    chunked: bool  # a Transfer-Encoding header came


class PredictPath:
    """The MindSpore predict route without Starlette's routing and middleware (see the module docstring).

    Same contract as ``predict`` in `build_app`: the URL, the body size limit (declared and actual), the body,
    the deadline header, then `Dispatcher.predict` cancelled when the client hangs up; errors through
    `_error_response`, bugs logged and answered 500; the answer from `_results_response`. API keys: a request
    that carries a valid one is served here, any other goes on to the app whose middleware answers 401.
    """

    def __init__(self, app: ASGIApp, dispatcher: Dispatcher, max_msg_bytes: int, keys: auth.ApiKeys) -> None:
        self.app = app
        self.dispatcher = dispatcher
        self.max_msg_bytes = max_msg_bytes
        self.keys = keys

    def takes(self, method: bytes | str, path: str, headers: Sequence[tuple[bytes, bytes]]) -> PlainPredict | None:
        """The headers this route needs when it answers a request for ``path`` (its ASGI form: decoded, no query)
        with raw ``headers`` (lower-case names, as ASGI has them); None when the app answers it instead: not a
        ``POST`` of a plain ``/model/...`` path (`_PLAIN`), an event stream asked for (Starlette's streaming
        route), or, with API keys configured, no valid key (the app's middleware answers 401). Main's HTTP
        protocol asks the same question before it answers a request itself (`fast_http`)."""
        if method not in ("POST", b"POST") or not path.startswith("/model/") or not _PLAIN.fullmatch(path):
            return None
        found: list[bytes | None] = [None, None, None, None]
        for name, value in headers:
            index = _WANTED.get(name)
            if index is not None and found[index] is None:
                found[index] = value
        declared, accept, timeout_raw, encoding = found
        if accept is not None and _EVENT_STREAM in accept.lower():
            return None
        if self.keys:
            key = auth.bearer_key(headers)
            if key is None or not self.keys.allows(key):
                return None
        return PlainPredict(declared, timeout_raw, encoding is not None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plain = None if scope["type"] != "http" or scope.get("root_path") else \
            self.takes(scope["method"], scope.get("path", ""), scope["headers"])
        if plain is None:
            await self.app(scope, receive, send)
            return
        response = await self._predict(scope["path"], receive, plain.content_length, plain.timeout)
        await response(scope, receive, send)

    async def _predict(self, path: str, receive: Receive, declared: bytes | None,
                       timeout_raw: bytes | None) -> Response:
        try:
            parse_url(path)  # the URL's errors come before the body's size
            body = await read_body(receive, None if declared is None else declared.decode("latin-1"),
                                   self.max_msg_bytes)
        except ServingError as exc:
            return _error_response(exc)
        except Exception as exc:
            return _bug_response(path, exc)
        return await self.respond(path, body, timeout_raw, receive)

    async def respond(self, path: str, body: bytes, timeout_raw: bytes | None,
                      receive: Receive | None = None) -> Response:
        """The answer to MindSpore's predict of ``path`` (a `_PLAIN` path) with a whole ``body`` within the size
        limit and the deadline header's raw value. With ``receive`` (the ASGI route) the dispatch is cancelled
        when the client hangs up (`until_disconnect`); without, the caller cancels the calling task then
        (`servable_framework.main.fast_http`)."""
        try:
            target = parse_url(path)
            timeout_text = None if timeout_raw is None else timeout_raw.decode("latin-1")
            bad_timeout: InvalidInput | None = None
            try:
                timeout = parse_timeout(timeout_text)
            except InvalidInput as exc:  # the body's own errors come first: it is parsed here, then this raised
                timeout, bad_timeout = None, exc
            if bad_timeout is None:
                work = self.dispatcher.predict_rest(target.servable, target.method, target.version, body, timeout)
                answer = await (work if receive is None else until_disconnect(receive, work, path))
                if answer is not None:
                    return Response(answer.body, status_code=answer.status, media_type=JSON)
            instances = parse_body(body)
            if bad_timeout is not None:
                raise bad_timeout
            run = self.dispatcher.predict(target.servable, target.method, target.version, instances, timeout,
                                          protocol="rest")
            results = await (run if receive is None else until_disconnect(receive, run, path))
        except ServingError as exc:
            return _error_response(exc)
        except Exception as exc:
            return _bug_response(path, exc)
        return _results_response(results)


async def _stream_response(request: Request, stream: AsyncIterator[StreamPiece], count: int) -> Response:
    """SSE from the first piece with outputs on; until then (errors of single instances are kept) a request
    that fails or ends is answered as the non-streaming form would be, with its status code."""
    early: list[StreamPiece] = []

    async def first() -> StreamPiece | None:
        async for piece in stream:
            if piece.error is None:
                return piece
            early.append(piece)
        return None

    head = await unless_client_leaves(request, first())
    if head is None:  # every instance failed before any output
        results: list[Result] = [ServingError("the instance ended without outputs")] * count
        for piece in early:
            if piece.error is not None and 0 <= piece.index < count:
                results[piece.index] = piece.error
        return _results_response(results)
    return EventStream(_events([*early, head], stream), media_type=EVENT_STREAM,
                        headers=SSE_HEADERS)


async def _events(head: list[StreamPiece], stream: AsyncIterator[StreamPiece]) -> AsyncIterator[bytes]:
    try:
        for piece in head:
            yield _event(piece)
        async for piece in stream:
            yield _event(piece)
    except ServingError as exc:
        yield sse({"error_msg": exc.message}, "error")
    except Exception as exc:  # a bug: the 200 is gone, say it in the stream
        log.exception("unexpected error in a stream")
        yield sse({"error_msg": f"Serving Error: internal error: {type(exc).__name__}"}, "error")
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _event(piece: StreamPiece) -> bytes:
    if piece.error is None:
        try:
            return sse({"index": piece.index, **encode_outputs(piece.outputs), "finish_reason": piece.finish})
        except ServingError as exc:
            piece = StreamPiece(piece.index, {}, error=exc)
    assert piece.error is not None
    return sse({"index": piece.index, "error_msg": piece.error.message}, "error")


