"""`streamer`: a distributed test servable (2 TP ranks, no weights) whose shard, `tests.support.agents:StreamShard`,
"generates" the UTF-8 bytes of its input text back, a few bytes per step: byte-level tokens, so multi-byte
characters are split across steps, and the postprocess decodes with ``errors="replace"``.

Methods (same inputs, same outputs ``text`` and ``tokens``): ``generate`` (``stream=True``) and
``generate_plain`` (not streaming). Optional inputs: ``step_ms`` (duration of one step, default 5) and
``fail_at`` (>= 0: the batch fails once an instance has produced that many tokens).
"""

import numpy as np

from servable_framework.server import distributed, register

model = distributed.declare_servable(rank_size=2, stage_size=1, with_batch_dim=True,
                                     shard="tests.support.agents:StreamShard", max_batch_size=4)


def _number(value):
    return float(np.asarray(value).reshape(-1)[0])


def encode(text, step_ms, fail_at):
    if not isinstance(text, str):
        raise ValueError("'text' must be a string")
    tokens = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)
    return tokens, np.array([_number(step_ms), _number(fail_at)], np.float64)


def decode(tokens):
    tokens = np.asarray(tokens, np.int64)
    return bytes(tokens.astype(np.uint8).tolist()).decode("utf-8", errors="replace"), tokens


@register.register_method(output_names=["text", "tokens"], stream=True)
def generate(text, step_ms=5, fail_at=-1):
    tokens, params = register.add_stage(encode, text, step_ms, fail_at, outputs_count=2)
    out = register.add_stage(model, tokens, params, outputs_count=1)
    text, tokens = register.add_stage(decode, out, outputs_count=2)
    return text, tokens


@register.register_method(output_names=["text", "tokens"])
def generate_plain(text, step_ms=5, fail_at=-1):
    tokens, params = register.add_stage(encode, text, step_ms, fail_at, outputs_count=2)
    out = register.add_stage(model, tokens, params, outputs_count=1)
    text, tokens = register.add_stage(decode, out, outputs_count=2)
    return text, tokens
