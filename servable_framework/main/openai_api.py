"""OpenAI-compatible API on the REST port: ``GET /v1/models[/{model}]``, ``POST /v1/chat/completions``.

A servable opts in to chat by declaring a streaming method named ``chat`` (`CHAT_METHOD`)::

    @register.register_method(output_names=["text", "prompt_tokens", "completion_tokens"], stream=True)
    def chat(messages, max_tokens=None, temperature=None, top_p=None, seed=None): ...

Inputs: ``messages``, a JSON string of OpenAI chat messages (roles system / user / assistant; content a string or
a list of ``{"type": "text"}`` and ``{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}``
parts), and the optional sampling options (numbers; absent when the client did not set them). Outputs: ``text``
(prefix-stable, see `servable_framework.worker.streaming`), ``prompt_tokens`` and ``completion_tokens``: either
the token ids (1-d int arrays, recommended: they stream as rows, so usage is right also when a stop string ends
the request early) or the counts (0-d ints, which only arrive in the last piece).

``model`` is the servable's name (its newest version). Every request runs through `Dispatcher.predict_stream`;
a non-streaming answer is assembled from the pieces. Stop strings (``stop``) are handled here on the text: the
text is cut before the first stop string, ``finish_reason`` is ``"stop"``, and leaving the dispatcher's stream
cancels the rows on the Agents; while streaming, a tail of the text that could still begin a stop string is held
back. Finish reasons: the model's ``eos`` / ``stop`` / ``done`` -> ``"stop"``, ``length`` -> ``"length"``.

Errors: ``{"error": {"message", "type", "param", "code"}}`` with the status of `_status` (400, 404 unknown
model, 413, 429 overloaded (+ ``Retry-After``), 503 unavailable, 504 timeout, 500). A request that fails before
its first piece is answered with that status; once a stream's 200 is out, an error is one ``data: {"error": ...}``
event, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from servable_framework.errors import (
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServingError,
    Unavailable,
)
from servable_framework.main.dispatcher import Dispatcher, StreamPiece
from servable_framework.main.http import (
    EVENT_STREAM,
    SSE_HEADERS,
    EventStream,
    read_limited,
    request_timeout,
    sse,
    unless_client_leaves,
)
from servable_framework.wire import Instance

log = logging.getLogger("servable_framework.openai")

CHAT_METHOD = "chat"
MAX_STOP_STRINGS = 16
SEED_MAX = 2**53  # seeds travel as float64 to the engine: larger ones would not stay exact
# the model's finish reason -> OpenAI's
FINISH = {"eos": "stop", "stop": "stop", "done": "stop", "length": "length", "cancelled": "stop"}


class OpenAIError(ServingError):
    """A request error of this protocol that names the offending field (``param``)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.http_status, self.code = param, status, code


# -- request body ---------------------------------------------------------------------------------------------


class _Model(BaseModel):
    # strict: "12" is not a number and 1 is not a string; unknown fields are accepted (as OpenAI's own server and
    # vLLM do); known fields we do not implement are refused by `ChatRequest._unsupported`
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: str | None = None

    @field_validator("url")
    @classmethod
    def _inline_only(cls, url: str) -> str:
        if re.match(r"(?i)https?://", url):
            raise ValueError("the server never fetches URLs on a client's behalf: send the image inline as a "
                             "data URL (data:image/png;base64,...)")
        if not url.startswith("data:image/"):
            raise ValueError("an image must be a data:image/...;base64,... URL")
        return url


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise ValueError(f"give at most {MAX_STOP_STRINGS} non-empty stop strings")
        return stop

    @model_validator(mode="after")
    def _unsupported(self) -> ChatRequest:
        extra = self.model_extra or {}

        def refuse(param: str, what: str) -> None:
            raise OpenAIError(f"{what} is not supported by this server", param, code="unsupported_parameter")

        if self.n is not None and self.n > 1:
            refuse("n", "n > 1 (several choices per request)")
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if extra.get(name) is not None:
                refuse(name, "tool and function calling")
        if extra.get("logprobs") or extra.get("top_logprobs") is not None:
            refuse("logprobs" if extra.get("logprobs") else "top_logprobs", "logprobs")
        response_format = extra.get("response_format")
        if response_format is not None and response_format != {"type": "text"}:
            refuse("response_format", "response_format other than text")
        if extra.get("logit_bias"):
            refuse("logit_bias", "logit_bias")
        for name in ("presence_penalty", "frequency_penalty"):
            if extra.get(name):
                refuse(name, name)
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("stream_options is only allowed with stream: true", "stream_options")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def instance(self) -> Instance:
        """The chat method's inputs (optional ones only when set)."""
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else [p.model_dump(exclude_none=True)
                                                                              for p in m.content]}
                    for m in self.messages]
        inst: Instance = {"messages": json.dumps(messages, ensure_ascii=False)}
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        for name, value, dtype in (("max_tokens", max_tokens, np.int64), ("temperature", self.temperature, np.float64),
                                   ("top_p", self.top_p, np.float64), ("seed", self.seed, np.int64)):
            if value is not None:
                inst[name] = np.asarray(value, dtype=dtype)
        return inst


def parse_request(body: bytes) -> ChatRequest:
    """The validated body, or `OpenAIError` (400) saying what is wrong and where (the validators of
    `ChatRequest` raise theirs, with its ``param``, directly)."""
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            raise OpenAIError(f"the body is not valid JSON: {errors[0]['ctx']['error']}") from None
        # the most telling error: one of our own checks, else the deepest (a union's failed branches are shallow)
        best = min(errors, key=lambda e: (e["type"] != "value_error", -len(e["loc"])))
        param = _param(best["loc"])
        msgs = dict.fromkeys(_readable(e) for e in errors if _param(e["loc"]) == param)
        raise OpenAIError(f"invalid request: {param or 'body'}: {' or '.join(msgs)}", param or None) from None


def _param(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as a field path (``messages[0].content[1].image_url.url``), without the labels
    of union branches and the tags of tagged unions."""
    out, tag_next = "", False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif tag_next:
            tag_next = False
        elif "[" in part or part in ("str", "int", "float", "bool", "none"):
            tag_next = part.startswith("list[tagged-union") or part.startswith("tagged-union")
        else:
            out += f".{part}" if out else part
    return out


def _readable(error: Any) -> str:
    msg = str(error["msg"])
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


# -- errors ---------------------------------------------------------------------------------------------------

_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
          504: "timeout_error"}
# the framework's wrapping of a stage's error (MindSpore's text): the servable's own message is what a client needs
_STAGE_PREFIX = re.compile(r"^Call .+? Failed, method: '[^']*', stage index\(begin with 1\): \d+, error msg: ")


def _status(exc: ServingError) -> int:
    """The one mapping of the framework's errors to this protocol's statuses."""
    if isinstance(exc, OpenAIError):
        return exc.http_status
    for cls, status in ((Overloaded, 429), (Unavailable, 503), (RequestTimeout, 504), (InvalidInput, 400),
                        (NotFound, 404), (PayloadTooLarge, 413), (MethodNotAllowed, 405)):
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: ServingError) -> dict[str, Any]:
    status = _status(exc)
    return {"error": {"message": _STAGE_PREFIX.sub("", exc.message),
                      "type": _TYPES.get(status, "server_error"),
                      "param": exc.param if isinstance(exc, OpenAIError) else None,
                      "code": exc.code if isinstance(exc, OpenAIError) else None}}


def error_response(exc: ServingError) -> Response:
    status = _status(exc)
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


# -- the completion -------------------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, outputs: Instance) -> None:
        """Token ids (1-d) add up piece by piece; a count (0-d) is the total."""
        for name in ("prompt_tokens", "completion_tokens"):
            value = outputs.get(name)
            if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
                setattr(self, name, int(value) if value.ndim == 0 else getattr(self, name) + len(value))

    def body(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is the beginning of a stop string (it may still become one)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


async def completion(pieces: AsyncIterator[StreamPiece], stops: list[str], usage: Usage
                     ) -> AsyncGenerator[tuple[str, str | None], None]:
    """The dispatcher's pieces of one chat instance -> ``(new text, None)`` ..., then ``(rest, finish_reason)``.
    Applies the stop strings; always closes ``pieces`` (which cancels the request if it was still running)."""
    text = ""  # received and not given out yet
    try:
        async for piece in pieces:
            if piece.error is not None:
                raise piece.error
            usage.add(piece.outputs)
            new = piece.outputs.get("text", "")
            if not isinstance(new, str):
                raise ServingError(f"the servable's '{CHAT_METHOD}' method has no text output 'text'")
            text += new
            cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
            if cuts:
                yield text[:min(cuts)], "stop"
                return
            if piece.finish is not None:  # the model's end: the request's end follows at once; take it first, so
                async for _ in pieces:      # that closing the stream below does not send a needless CANCEL
                    pass
                yield text, FINISH.get(piece.finish, "stop")
                return
            ready = len(text) - _held_back(text, stops)
            if ready > 0:
                yield text[:ready], None
                text = text[ready:]
        raise ServingError("the chat stream ended without a finish reason")
    finally:
        aclose = getattr(pieces, "aclose", None)
        if aclose is not None:
            await aclose()


# -- routes ---------------------------------------------------------------------------------------------------


def chat_models(dispatcher: Dispatcher) -> list[str]:
    """Servables whose Workers declare a streaming ``chat`` method."""
    return sorted({h.servable for h in dispatcher.workers.workers.values()
                   if CHAT_METHOD in h.methods and CHAT_METHOD in h.streaming})


def routes(dispatcher: Dispatcher, max_msg_bytes: int) -> list[BaseRoute]:
    """The routes this protocol adds to Main's REST app (mounted before MindSpore's catch-all route)."""

    created = int(time.time())

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "servable_framework"}

    def guarded(handler: Callable[[Request], Coroutine[Any, Any, Response]], method: str | None
                ) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                if method is not None and request.method != method:
                    raise MethodNotAllowed(f"{request.url.path} only supports {method}")
                return await handler(request)
            except ServingError as exc:
                return error_response(exc)
            except Exception as exc:  # a bug: log it, answer 500 in the protocol's shape, keep serving
                log.exception("unexpected error on %s", request.url.path)
                return error_response(ServingError(f"internal error: {type(exc).__name__}"))

        return endpoint

    async def list_models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(m) for m in chat_models(dispatcher)]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        if name not in chat_models(dispatcher):
            raise _unknown_model(name)
        return JSONResponse(model_card(name))

    async def chat_completions(request: Request) -> Response:
        req = parse_request(await read_limited(request, max_msg_bytes))
        if req.model not in chat_models(dispatcher):
            starting = any(h.servable == req.model and not h.methods for h in dispatcher.workers.workers.values())
            if not starting:
                raise _unknown_model(req.model)
            dispatcher.pick(req.model, CHAT_METHOD, 0)  # not registered yet: raises why (unavailable)
        timeout = request_timeout(request)
        ident, created_at = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = Usage()

        def stream_events() -> AsyncGenerator[tuple[str, str | None], None]:
            return completion(dispatcher.predict_stream(req.model, CHAT_METHOD, 0, [req.instance()], timeout,
                                                        protocol="openai"), req.stops, usage)

        async def whole() -> tuple[str, str | None]:
            parts: list[str] = []
            finish: str | None = None
            async for more, end in stream_events():
                parts.append(more)
                finish = end
            return "".join(parts), finish

        content: str
        finish: str | None
        if not req.stream and not req.stops:
            # nothing to cut on the way: one plain predict (no per-step postprocess in the Worker); the finish
            # reason follows from the counts (the engine leaves EOS out, so only the limit makes a full count)
            results = await unless_client_leaves(request, dispatcher.predict(
                req.model, CHAT_METHOD, 0, [req.instance()], timeout, protocol="openai"))
            result = results[0]
            if isinstance(result, ServingError):
                raise result
            usage.add(result)
            text = result.get("text")
            if not isinstance(text, str):
                raise ServingError(f"the servable's '{CHAT_METHOD}' method has no text output 'text'")
            content = text
            limit = result.get("max_tokens")
            finish = "length" if isinstance(limit, np.ndarray) and usage.completion_tokens >= int(limit) else "stop"
        elif not req.stream:
            content, finish = await unless_client_leaves(request, whole())
        if not req.stream:
            return JSONResponse({
                "id": ident, "object": "chat.completion", "created": created_at, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                             "finish_reason": finish}],
                "usage": usage.body()})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_events()

        def chunk(choices: list[dict[str, Any]], **more: Any) -> bytes:
            body: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created_at,
                                    "model": req.model, "choices": choices}
            if include_usage:
                body["usage"] = None
            body.update(more)
            return sse(body)

        def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        async def first() -> tuple[str, str | None]:
            return await events.__anext__()

        # the first event before the 200: a request refused or failed early gets its status code
        head = await unless_client_leaves(request, first())

        async def chunks() -> AsyncIterator[bytes]:
            try:
                yield chunk(choice({"role": "assistant", "content": ""}))
                text, finish = head
                while True:
                    if text:
                        yield chunk(choice({"content": text}))
                    if finish is not None:
                        break
                    text, finish = await events.__anext__()
                yield chunk(choice({}, finish))
                if include_usage:
                    yield chunk([], usage=usage.body())
            except ServingError as exc:  # the 200 is gone: say it in the stream
                yield sse(error_body(exc))
            except Exception as exc:
                log.exception("unexpected error in a chat stream")
                yield sse(error_body(ServingError(f"internal error: {type(exc).__name__}")))
            finally:
                await events.aclose()
            yield b"data: [DONE]\n\n"

        return EventStream(chunks(), media_type=EVENT_STREAM, headers=SSE_HEADERS)

    async def unknown_route(request: Request) -> Response:
        raise OpenAIError(f"no route {request.method} {request.url.path}", status=404, code="unknown_url")

    every = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    return [
        Route("/v1/models", guarded(list_models, "GET"), methods=every),
        Route("/v1/models/{model:path}", guarded(get_model, "GET"), methods=every),
        Route("/v1/chat/completions", guarded(chat_completions, "POST"), methods=every),
        Route("/v1/{path:path}", guarded(unknown_route, None), methods=every),
    ]


def _unknown_model(name: str) -> OpenAIError:
    return OpenAIError(f"The model `{name}` does not exist or cannot chat (GET /v1/models lists those that can)",
                       "model", status=404, code="model_not_found")
