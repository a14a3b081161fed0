"""The few exceptions of servable_framework, each with the HTTP status it maps to.

Inside a process we raise these; across a socket they travel as ``(kind, message)`` text
(`ServingError.to_wire` / `from_wire`), never pickled. The REST front end maps them to HTTP in
one place (`servable_framework.main.rest`), keeping MindSpore's body shape ``{"error_msg": ...}``.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class. ``message`` is the user-facing text (MindSpore's error fragments live here)."""

    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"kind": type(self).__name__, "msg": self.message}

    @staticmethod
    def from_wire(payload: dict[str, str]) -> ServingError:
        cls = _KINDS.get(payload.get("kind", ""), ServingError)
        return cls(payload.get("msg", "unknown error"))


class InvalidInput(ServingError):
    """The request itself is wrong (parse error, missing input, dtype/size mismatch)."""

    http_status = 400


class NotFound(ServingError):
    """Unknown servable, version or method."""

    http_status = 404


class MethodNotAllowed(ServingError):
    http_status = 405


class PayloadTooLarge(ServingError):
    http_status = 413


class Unavailable(ServingError):
    """The servable exists but cannot serve now (a worker or an agent is down, draining)."""

    http_status = 503


class Overloaded(Unavailable):
    """Load shedding: the queue limit is reached. REST adds ``Retry-After``."""

    http_status = 503


class RequestTimeout(ServingError):
    http_status = 504


class ClientClosedRequest(ServingError):
    """The REST client hung up before the answer (nginx's 499; nobody receives this response)."""

    http_status = 499


class StartupError(ServingError):
    """A servable, worker or agent failed to start (raised by the ``start_*`` calls)."""


_KINDS: dict[str, type[ServingError]] = {
    c.__name__: c
    for c in (
        ServingError,
        InvalidInput,
        NotFound,
        MethodNotAllowed,
        PayloadTooLarge,
        Unavailable,
        Overloaded,
        RequestTimeout,
        StartupError,
    )
}
