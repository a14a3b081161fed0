"""API keys on the REST port (as vLLM's ``--api-key``): ASGI middleware around Main's Starlette app.

Keys come from a file (setting ``api_key_file``, env ``SERVABLE_API_KEY_FILE``: one key per line, blank lines and
lines starting with ``#`` skipped) and/or env ``SERVABLE_API_KEYS`` (comma-separated); never from a command line
(``ps`` shows it). With at least one key configured, every request except ``GET /health`` and ``GET /ready``
needs ``Authorization: Bearer <key>`` (what the ``openai`` client sends) and is otherwise answered 401 before
routing, in its protocol's error shape: MindSpore's ``{"error_msg"}``, OpenAI's ``{"error": {"message", "type",
"param", "code": "invalid_api_key"}}`` under ``/v1``, KServe's ``{"error"}`` under ``/v2``. No key configured:
no check (the default).

The middleware holds SHA-256 digests of the keys only and compares the digest of the key presented with every
one of them (`hmac.compare_digest`, no early exit), so the time taken tells nothing about the keys. Keys are
never logged, also not in errors (a bad key file is named by path and line number).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from servable_framework.settings import Settings

log = logging.getLogger("servable_framework.auth")

OPEN_PATHS = frozenset({"/health", "/ready"})
MISSING = "missing API key: send the header 'Authorization: Bearer <key>'"
INVALID = "invalid API key"


class ApiKeys:
    """The configured keys, as digests. Empty: no check."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = tuple(_digest(k.encode()) for k in keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._digests)} keys)"

    def allows(self, key: bytes) -> bool:
        """Whether ``key`` is one of the keys: compared with every key, in constant time."""
        given = _digest(key)
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(given, digest)
        return ok


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def load_keys(settings: Settings) -> ApiKeys:
    """The keys of ``api_key_file`` and ``api_keys``.

    Raises:
        RuntimeError: the key file cannot be read, holds no key, or a key holds other than visible ASCII.
    """
    keys: list[str] = []
    if settings.api_key_file:
        path = Path(settings.api_key_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise RuntimeError(f"Serving Error: cannot read the API key file {path}: {reason}") from None
        for number, line in enumerate(text.splitlines(), 1):
            key = line.strip()
            if key and not key.startswith("#"):
                _check(key, f"line {number} of the API key file {path}")
                keys.append(key)
        if not keys:
            raise RuntimeError(f"Serving Error: the API key file {path} holds no key")
    if settings.api_keys is not None:
        for number, part in enumerate(settings.api_keys.get_secret_value().split(","), 1):
            key = part.strip()
            if key:
                _check(key, f"key {number} of SERVABLE_API_KEYS")
                keys.append(key)
    return ApiKeys(keys)


def _check(key: str, where: str) -> None:
    if not all(33 <= ord(c) <= 126 for c in key):
        raise RuntimeError(f"Serving Error: the API key on {where} holds characters other than visible ASCII")


def warn_if_exposed(host: str, keys: ApiKeys, tls: bool) -> None:
    """Log a warning when the REST server listens beyond this host without keys and TLS (or keys without TLS)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback or tls:
        return
    if not keys:
        log.warning("the RESTful server listens on %s, which is not a loopback address, with no API key and no "
                    "TLS: anyone who can reach it can use every servable. Set SERVABLE_API_KEY_FILE and an "
                    "ssl_config, or listen on 127.0.0.1", host)
    else:
        log.warning("the RESTful server listens on %s without TLS: API keys travel in clear text; give it an "
                    "ssl_config", host)


class ApiKeyMiddleware:
    """Answers 401 to a request without a valid key (every path but `OPEN_PATHS`), before any routing."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        key = bearer_key(scope["headers"])
        if key is not None and self.keys.allows(key):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await unauthorized(scope["path"], MISSING if key is None else INVALID)(scope, receive, send)


def bearer_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key of the first ``Authorization: Bearer <key>`` header of raw ``headers``, None when there is none."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, key = bytes(value).strip().partition(b" ")
            if scheme.lower() == b"bearer" and key.strip():
                return key.strip()
            return None
    return None


def unauthorized(path: str, message: str) -> JSONResponse:
    """401 in the error shape of the protocol ``path`` belongs to."""
    body: object
    if path == "/v1" or path.startswith("/v1/"):  # OpenAI
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}
    elif path == "/v2" or path.startswith("/v2/"):  # KServe v2
        body = {"error": message}
    else:  # MindSpore
        body = {"error_msg": message}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
