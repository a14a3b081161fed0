"""KServe v2 / Open Inference Protocol REST (``/v2/...``) on Main's REST port, next to MindSpore's routes.

Routes (KServe's table, versions included)::

    GET  /v2                                        server metadata {name, version, extensions}
    GET  /v2/health/live                            {"live": bool}; 503 when not (the rule of /health)
    GET  /v2/health/ready                           {"ready": bool}; 503 when not ready (as /ready)
    GET  /v2/models/{model}[/versions/{v}]          model metadata {name, versions, platform, inputs, outputs}
    GET  /v2/models/{model}[/versions/{v}]/ready    {"name", "ready"}; 503 when not ready
    POST /v2/models/{model}[/versions/{v}]/infer    inference: JSON tensors, binary-data extension

Models. One KServe model per servable: ``{servable}`` is its default method, which is the servable's only
method, or the method named ``predict`` when it has several (a servable with several methods and none named
``predict`` has no default: ``{servable}`` then answers 404 naming its models). ``{servable}.{method}`` names
any method (the default one too; split at the last dot). ``/versions/{v}`` is the servable's version number
``v`` (without it: the newest version, as in MindSpore's URL). ``platform`` is ``"servable_framework"``.

Batch semantics: a request's input tensors form ONE instance of the method (a KServe request is a MindSpore
instance): tensor ``x1`` of shape [2, 2] is the instance's ``x1``, a [2, 2] array. A model declared
``with_batch_dim`` still gets one instance per request (the Worker batches concurrent requests, as it does
MindSpore's). The codec rules (datatypes, JSON and binary data) are in `servable_framework.main.kserve_codec`.

Metadata (what the servable declares, see `servable_framework.worker.signatures`): inputs and outputs by
name in declaration order; datatype and shape are the model's where a method input goes straight into a local
model (or an output comes straight out of one), ``-1`` for a dynamic dim; an optional input is typed by its
default (a ``str`` default is BYTES [1]); anything else is datatype ``"UNKNOWN"`` with shape ``[-1]`` (any
type, any rank: the method's Python stages decide). Inputs also carry ``"optional": true`` when the method has
a default for them.

Errors are ``{"error": "..."}`` (KServe's shape) with the status of their kind, mapped in one place
(`_error_response`): 400 bad input (malformed JSON, wrong datatype, shape/data mismatch, truncated binary data,
the servable's own input checks), 404 unknown model, version or ``/v2`` path, 405 wrong HTTP method, 413 body
over ``max_msg_mb_size``, 503 unavailable or overloaded (+ ``Retry-After``), 504 past the deadline (header
``X-Request-Timeout-S``, else Triton's request parameter ``timeout`` in microseconds, else the servable's). A
request that compressed its body (``Content-Encoding: gzip|deflate``, as ``tritonclient`` can) is decompressed
within the same size limit.
"""

from __future__ import annotations

import importlib.metadata
import logging
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from servable_framework.errors import (
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServingError,
    Unavailable,
)
from servable_framework.main.dispatcher import Dispatcher
from servable_framework.main.http import read_limited, request_timeout, unless_client_leaves
from servable_framework.main.kserve_codec import HEADER_LENGTH, DecodedRequest, datatype_of, decode_request
from servable_framework.main.kserve_codec import encode_response as encode_infer_response
from servable_framework.main.workers import WorkerHandle, WorkerState

log = logging.getLogger("servable_framework.kserve")

SERVER_NAME = "servable_framework"
PLATFORM = "servable_framework"
EXTENSIONS = ["binary_tensor_data"]
DEFAULT_METHOD = "predict"
UNKNOWN_DATATYPE = "UNKNOWN"
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]

Handler = Callable[[Request], Awaitable[Response]]


def _server_version() -> str:
    try:
        return importlib.metadata.version("servable_framework")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def routes(dispatcher: Dispatcher, max_msg_bytes: int) -> list[BaseRoute]:
    """The routes this protocol adds to Main's REST app (mounted before MindSpore's catch-all route)."""

    version = _server_version()

    async def server_metadata(_: Request) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": version, "extensions": EXTENSIONS})

    async def live(_: Request) -> Response:
        # the same rule as /health: not live once a servable has no Worker left and no restart to come
        live = not dispatcher.workers.lost()
        return JSONResponse({"live": live}, status_code=200 if live else 503)

    async def ready(_: Request) -> Response:
        servables = dispatcher.ready()
        ok = bool(servables) and all(s["ready"] for s in servables.values()) and not dispatcher.draining
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def model_metadata(request: Request) -> Response:
        return JSONResponse(_metadata(_resolve(dispatcher, request)))

    async def model_ready(request: Request) -> Response:
        model = _resolve(dispatcher, request)
        ok = model.ready and not dispatcher.draining
        return JSONResponse({"name": model.name, "ready": ok}, status_code=200 if ok else 503)

    async def infer(request: Request) -> Response:
        body = _decompressed(request, await read_limited(request, max_msg_bytes), max_msg_bytes)
        model = _resolve(dispatcher, request)
        decoded = decode_request(body, request.headers.get(HEADER_LENGTH))
        _check_names(model, decoded)
        timeout = request_timeout(request) or decoded.timeout_s
        results = await unless_client_leaves(
            request, dispatcher.predict(model.servable, model.method, model.version, [decoded.instance], timeout,
                                        protocol="kserve"))
        if len(results) != 1:
            raise ServingError(f"Serving Error: expected one result, the Worker sent {len(results)}")
        result = results[0]
        if isinstance(result, ServingError):
            raise result
        encoded = encode_infer_response(model.name, model.served_version, decoded.id, result, decoded.outputs,
                                        decoded.binary_output)
        if encoded.header_length is None:
            return Response(encoded.body, media_type="application/json")
        return Response(encoded.body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(encoded.header_length)})

    async def unknown_path(request: Request) -> Response:
        raise NotFound(f"unknown KServe v2 path {request.url.path!r}")

    table: list[tuple[str, Handler, str]] = [
        ("/v2", server_metadata, "GET"),
        ("/v2/health/live", live, "GET"),
        ("/v2/health/ready", ready, "GET"),
    ]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        table += [(base, model_metadata, "GET"), (base + "/ready", model_ready, "GET"),
                  (base + "/infer", infer, "POST")]
    out: list[BaseRoute] = [Route(path, _guarded(handler, method), methods=_ALL_METHODS)
                            for path, handler, method in table]
    out.append(Route("/v2/{path:path}", _guarded(unknown_path, None), methods=_ALL_METHODS))
    return out


# ----------------------------------------------------------------------------------------------- errors


def _error_response(exc: Exception, path: str) -> Response:
    """Every error of this protocol: ``{"error": text}`` with its kind's HTTP status (the one mapping)."""
    if not isinstance(exc, ServingError):  # a bug: log it, answer 500, keep serving
        log.error("unexpected error on %s", path, exc_info=exc)
        exc = ServingError(f"Serving Error: internal error: {type(exc).__name__}")
    headers = {"Retry-After": "1"} if isinstance(exc, Overloaded) else None
    return JSONResponse({"error": exc.message}, status_code=exc.http_status, headers=headers)


def _guarded(handler: Handler, method: str | None) -> Handler:
    """``handler`` for its HTTP ``method`` (GET also answers HEAD); any error becomes `_error_response`."""
    allowed = {"GET", "HEAD"} if method == "GET" else {method or ""}

    async def run(request: Request) -> Response:
        try:
            if method is not None and request.method not in allowed:
                raise MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}: use {method}")
            return await handler(request)
        except Exception as exc:
            response = _error_response(exc, request.url.path)
            if isinstance(exc, MethodNotAllowed) and method is not None:
                response.headers["Allow"] = ", ".join(sorted(allowed))
            return response

    return run


# ------------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class _Model:
    """A KServe model name resolved to a servable method and version."""

    name: str  # as the client named it
    servable: str
    method: str
    version: int  # 0 = newest
    handles: list[WorkerHandle]  # the servable's Workers of that version

    @property
    def ready(self) -> bool:
        return any(h.state is WorkerState.READY and self.method in h.methods for h in self.handles)

    @property
    def served_version(self) -> str:
        return str(self.version or max(h.version for h in self.handles))

    def signature(self) -> dict[str, Any] | None:
        """The method's inputs/outputs as its Worker registered them; None when its Worker sent none."""
        ordered = sorted(self.handles, key=lambda h: h.state is not WorkerState.READY)
        for handle in ordered:
            if self.method in handle.signatures:
                signature: dict[str, Any] = handle.signatures[self.method]
                return signature
        return None


def _resolve(dispatcher: Dispatcher, request: Request) -> _Model:
    name = str(request.path_params["model"])
    version_text: str | None = request.path_params.get("version")
    every = list(dispatcher.workers.workers.values())
    servable, method = name, ""
    handles = [h for h in every if h.servable == name]
    if not handles and "." in name:
        servable, method = name.rsplit(".", 1)
        handles = [h for h in every if h.servable == servable]
    if not handles:
        raise NotFound(f"unknown model '{name}' (models: {', '.join(_model_names(every)) or 'none'})")
    versions = sorted({h.version for h in handles})
    version = 0
    if version_text is not None:
        version = int(version_text) if version_text.isdigit() and version_text.isascii() else -1
        if version not in versions or version == 0:
            raise NotFound(f"model '{name}' has no version '{version_text}' "
                           f"(versions: {', '.join(str(v) for v in versions)})")
    chosen = [h for h in handles if h.version == (version or versions[-1])]
    methods = _methods(chosen)
    if not methods:
        reasons = "; ".join(sorted({h.reason or h.state.value for h in chosen}))
        raise Unavailable(f"model '{name}' is not available yet: {reasons}")
    if not method:
        method = _default_method(methods)
        if not method:
            raise NotFound(f"model '{name}' has no default method (several methods, none named "
                           f"'{DEFAULT_METHOD}'): use one of {', '.join(f'{servable}.{m}' for m in methods)}")
    elif method not in methods:
        raise NotFound(f"unknown model '{name}': servable '{servable}' has no method '{method}' "
                       f"(methods: {', '.join(methods)})")
    return _Model(name, servable, method, version, chosen)


def _methods(handles: list[WorkerHandle]) -> list[str]:
    """The methods the Workers registered, in declaration order."""
    out: list[str] = []
    for handle in handles:
        out += [m for m in handle.methods if m not in out]
    return out


def _default_method(methods: list[str]) -> str:
    if len(methods) == 1:
        return methods[0]
    return DEFAULT_METHOD if DEFAULT_METHOD in methods else ""


def _model_names(handles: list[WorkerHandle]) -> list[str]:
    by_servable: dict[str, list[WorkerHandle]] = {}
    for handle in handles:
        by_servable.setdefault(handle.servable, []).append(handle)
    names: list[str] = []
    for servable, group in sorted(by_servable.items()):
        methods = _methods(group)
        if _default_method(methods):
            names.append(servable)
        names += [f"{servable}.{m}" for m in methods]
    return names


def _metadata(model: _Model) -> dict[str, Any]:
    signature = model.signature()
    if signature is None:  # a Worker that sent no signatures: the names Main routes by
        required = next((h.methods[model.method] for h in model.handles if model.method in h.methods), [])
        inputs: list[dict[str, Any]] = [_tensor_metadata({"name": n}) for n in required]
        outputs: list[dict[str, Any]] = []
    else:
        inputs = [_tensor_metadata(t) for t in signature.get("inputs", [])]
        outputs = [_tensor_metadata(t) for t in signature.get("outputs", [])]
    versions = sorted({h.version for h in model.handles})
    return {"name": model.name, "versions": [str(v) for v in versions], "platform": PLATFORM,
            "inputs": inputs, "outputs": outputs}


def _tensor_metadata(tensor: dict[str, Any]) -> dict[str, Any]:
    shape = tensor.get("shape")
    out: dict[str, Any] = {"name": tensor["name"],
                           "datatype": datatype_of(tensor.get("dtype")) or UNKNOWN_DATATYPE,
                           "shape": list(shape) if isinstance(shape, list) else [-1]}
    if tensor.get("optional"):
        out["parameters"] = {"optional": True}
    return out


def _check_names(model: _Model, request: DecodedRequest) -> None:
    """Refuse inputs the method does not take and outputs it does not give, before running it (the
    method's required inputs are the dispatcher's check)."""
    signature = model.signature()
    if signature is None:
        return
    inputs = [t["name"] for t in signature.get("inputs", [])]
    unknown = [name for name in request.instance if name not in inputs]
    if unknown:
        raise InvalidInput(f"model '{model.name}' has no input '{unknown[0]}' (inputs: {', '.join(inputs)})")
    outputs = [t["name"] for t in signature.get("outputs", [])]
    for item in request.outputs or []:
        if item.name not in outputs:
            raise InvalidInput(f"model '{model.name}' has no output '{item.name}' (outputs: {', '.join(outputs)})")


# -------------------------------------------------------------------------------------------------- body


def _decompressed(request: Request, body: bytes, limit: int) -> bytes:
    """The body as sent, or decompressed (``Content-Encoding: gzip | deflate``) within ``limit`` bytes."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"Content-Encoding '{encoding[:50]}' is not supported (gzip, deflate)")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"http message is bigger than {limit} once decompressed")
    if not inflater.eof:
        raise InvalidInput(f"the {encoding} body is truncated")
    return out
