"""Incremental postprocess of a streaming method (``register_method(..., stream=True)``), in the Worker.

The output rank sends, per step, the NEW model outputs of each streaming instance (`BatchLink.stream`). The
Worker keeps each instance's model outputs so far (`accumulate`: arrays concatenated along axis 0), runs the
method's remaining stages (the postprocess) on them, and sends only what is new (`OutputDiff`):

* ``str``: the new suffix. While the text ends with U+FFFD (the replacement character a byte-level detokenizer
  writes for a multi-byte character whose bytes have not all arrived) that tail is held back, so a broken
  character is never sent; the final piece sends everything.
* ``bytes``: the new suffix. Arrays with at least one dimension: the new rows (axis 0).
* Anything else (0-d arrays): only in the final piece, whole.

The rule the postprocess must follow (*prefix-stable*): its output for a prefix of the model outputs is a prefix
of its output for the whole (a plain ``tokenizer.decode`` is; a decoder that rewrites earlier text later is not).
Then the pieces of an output joined together equal the output of the non-streamed request exactly: the final
piece is computed from the same full outputs as a non-streamed answer. While an intermediate result does not
extend what was sent nothing is sent; a final output that does not extend it fails the instance
(`NotPrefixStable`) instead of sending text that would not add up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

import numpy as np

from servable_framework.errors import InvalidInput, ServingError
from servable_framework.wire import Instance, Value

REPLACEMENT = "\ufffd"


def not_streaming(servable: str, method: str) -> InvalidInput:
    """The error for a stream request to a method that was not declared ``stream=True`` (HTTP 400)."""
    return InvalidInput(f"Request servable({servable}) method({method}), the method does not support streaming: "
                        f"declare it with register_method(..., stream=True)")


class NotPrefixStable(ServingError):
    """A streaming method's final output does not extend what was already streamed (a servable bug)."""


@dataclass
class Piece:
    """What the Worker sends for one instance of a streaming request: the new part of each output, and on the
    instance's last piece its finish reason; or the error that ended the instance."""

    index: int
    outputs: Instance
    finish: str | None = None
    error: ServingError | None = None


def accumulate(so_far: list[Value] | None, new: list[Value]) -> list[Value]:
    """Append one step's new model outputs to the outputs so far: arrays along axis 0, str/bytes by
    concatenation; a value that cannot be appended to (0-d, or another type) is replaced."""
    if so_far is None:
        return list(new)
    out: list[Value] = []
    for old, add in zip(so_far, new, strict=True):
        if isinstance(old, np.ndarray) and isinstance(add, np.ndarray) and old.ndim and add.ndim:
            out.append(np.concatenate([old, add]) if len(add) else old)
        elif isinstance(old, (str, bytes)) and type(add) is type(old):
            out.append(old + add)  # type: ignore[operator]
        else:
            out.append(add)
    return out


Splittable = str | bytes | np.ndarray  # an output that grows piece by piece


def _splittable(value: Value) -> TypeGuard[Splittable]:
    return isinstance(value, (str, bytes)) or isinstance(value, np.ndarray) and value.ndim > 0


def _extends(value: Value, sent: Value) -> bool:
    if isinstance(value, (str, bytes)):
        return type(value) is type(sent) and value.startswith(sent)  # type: ignore[arg-type]
    assert isinstance(value, np.ndarray)
    return (isinstance(sent, np.ndarray) and value.shape[1:] == sent.shape[1:] and value.dtype == sent.dtype
            and len(value) >= len(sent) and bool(np.array_equal(value[:len(sent)], sent)))


class OutputDiff:
    """Per instance: turns successive complete outputs (the postprocess of the model outputs so far) into the
    deltas to send, following the rules of the module docstring."""

    def __init__(self) -> None:
        self.sent: dict[str, Splittable] = {}  # per output: everything sent so far, joined

    def delta(self, outputs: Instance, final: bool) -> Instance | None:
        """The new part of every output. Not final: only splittable outputs, None when none has anything new
        (or one does not extend what was sent: wait for more). Final: every output (possibly empty parts).

        Raises:
            NotPrefixStable: final, and an output does not extend what was sent.
        """
        out: Instance = {}
        now: dict[str, Splittable] = {}
        grew = False
        for name, value in outputs.items():
            if not _splittable(value):
                if final:
                    out[name] = value
                continue
            if isinstance(value, str) and not final:
                value = value.rstrip(REPLACEMENT)
            sent = self.sent.get(name, value[:0])
            if not _extends(value, sent):
                if final:
                    raise NotPrefixStable(f"the streamed output '{name}' is not a prefix of the final output: "
                                          f"the method's postprocess is not prefix-stable")
                return None
            new = value[len(sent):]
            out[name] = new
            grew = grew or len(new) > 0
            now[name] = value
        if not final and not grew:
            return None
        self.sent.update(now)
        return out
