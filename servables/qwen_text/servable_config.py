"""The `qwen_text` servable: Qwen2 / Qwen2.5 text-only chat models (``Qwen2ForCausalLM``), the model split over
distributed Agents.

Preprocess (the tokenizer's chat template) and postprocess (decode, also incrementally for streamed requests) run
in the Worker; generation runs on the Agents (``agents/qwen2.py`` on the engine in ``servable_framework/engine``:
TP inside a stage, pipeline stages across). Method ``predict``, streaming too (REST ``Accept: text/event-stream``,
``Client.infer_stream``); every input but one of ``prompt`` / ``messages`` is optional::

    {"instances": [{"prompt": "Tell me a story.", "max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9,
                    "top_k": 50, "seed": 1}]}
    {"instances": [{"messages": "[{\\"role\\": \\"system\\", \\"content\\": \\"Be brief.\\"},
                                  {\\"role\\": \\"user\\", \\"content\\": \\"Hi\\"}]"}]}
    -> {"instances": [{"text": "..."}]}

``messages`` is a JSON string of OpenAI-style chat messages (roles system / user / assistant; content a string
or a list of ``{"type": "text", "text": ...}`` parts). Greedy decoding unless ``temperature > 0``.

Method ``chat`` (streaming) is the OpenAI-compatible chat (``POST /v1/chat/completions`` with ``"model": "qwen_text"``,
see servable_framework/main/openai_api.py): inputs ``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``;
outputs ``text``, ``prompt_tokens`` and ``completion_tokens`` (the token ids; their counts are the usage).

Deployment knobs (environment, read when this file is imported by the Worker):
``QWEN_TEXT_CHECKPOINT`` (default: the tiny offline model, built on first use under ``tiny_models/``),
``QWEN_TEXT_RANK_SIZE`` (2), ``QWEN_TEXT_STAGE_SIZE`` (1), ``QWEN_TEXT_MAX_NEW_TOKENS`` (default 64),
``QWEN_TEXT_MAX_NEW_TOKENS_CAP`` (512), ``QWEN_TEXT_MAX_BATCH_SIZE`` (8), ``QWEN_TEXT_MAX_BATCH_DELAY_MS`` (5),
``QWEN_TEXT_MAX_MODEL_LEN`` (default: the checkpoint's ``max_position_embeddings``; a prompt whose length plus
``max_new_tokens`` is over it gets a 400 before it reaches the Agents),
``QWEN_TEXT_CONTINUOUS_BATCHING`` (1, the default: a request that arrives while a batch decodes joins it as rows
free up; 0: it waits for the running batch to finish).
"""

import json
import os
from pathlib import Path

import numpy as np

from servable_framework.engine.checkpoint import context_length
from servable_framework.engine.sampling import check_fits_context, request_number, sampling_vector
from servable_framework.server import distributed, register

from .tiny_model import build_tiny_qwen_text

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = os.environ.get("QWEN_TEXT_CHECKPOINT") or str(build_tiny_qwen_text(REPO / "tiny_models"))
DEFAULT_MAX_NEW_TOKENS = int(os.environ.get("QWEN_TEXT_MAX_NEW_TOKENS", "64"))
MAX_NEW_TOKENS_CAP = int(os.environ.get("QWEN_TEXT_MAX_NEW_TOKENS_CAP", "512"))
CONTEXT = context_length(CHECKPOINT, int(os.environ.get("QWEN_TEXT_MAX_MODEL_LEN", "0")) or None)


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


tokenizer = _load_tokenizer(CHECKPOINT)

model = distributed.declare_servable(
    rank_size=int(os.environ.get("QWEN_TEXT_RANK_SIZE", "2")),
    stage_size=int(os.environ.get("QWEN_TEXT_STAGE_SIZE", "1")),
    with_batch_dim=True,
    shard="qwen2",
    max_batch_size=int(os.environ.get("QWEN_TEXT_MAX_BATCH_SIZE", "8")),
    max_batch_delay_ms=float(os.environ.get("QWEN_TEXT_MAX_BATCH_DELAY_MS", "5")),
    continuous_batching=os.environ.get("QWEN_TEXT_CONTINUOUS_BATCHING", "1") == "1",
)


def _messages_from_json(text):
    """OpenAI-style chat messages -> the chat template's ``[{"role", "content": str}]``."""
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"'messages' is not valid JSON: {exc}") from None
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty JSON list of chat messages")
    out = []
    for msg in messages:
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise ValueError("each message must be an object with role system/user/assistant")
        content = msg.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"unsupported message part {str(part)[:80]} (this servable takes text only)")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ValueError("message 'content' must be a string or a list of text parts")
        out.append({"role": msg["role"], "content": content})
    return out


def preprocess(prompt, messages, max_new_tokens, temperature, top_p, top_k, seed):
    """Chat template + tokenizer -> (input_ids int64 [T], sampling float64 [5])."""
    if messages is not None:
        if prompt is not None:
            raise ValueError("give either 'messages' or 'prompt', not both")
        if not isinstance(messages, str):
            raise ValueError("'messages' must be a JSON string")
        chat = _messages_from_json(messages)
    elif prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("'prompt' must be a non-empty string")
        chat = [{"role": "user", "content": prompt}]
    else:
        raise ValueError("missing input: give 'prompt' or 'messages'")
    sampling = sampling_vector(max_new_tokens, temperature, top_p, top_k, seed,
                               default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS, max_new_tokens_cap=MAX_NEW_TOKENS_CAP)
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    check_fits_context(len(input_ids), sampling, CONTEXT)
    return np.asarray(input_ids, dtype=np.int64), sampling


def postprocess(output_ids):
    return tokenizer.decode(np.asarray(output_ids).tolist(), skip_special_tokens=True)


# streaming (REST ``Accept: text/event-stream``, ``Client.infer_stream``): ``postprocess`` is prefix-stable (a plain
# decode; Qwen's tokenizer does not clean up spaces), so the Worker runs it on the tokens so far and sends the new text
@register.register_method(output_names=["text"], stream=True)
def predict(prompt=None, messages=None, max_new_tokens=None, temperature=None, top_p=None, top_k=None, seed=None):
    input_ids, sampling = register.add_stage(
        preprocess, prompt, messages, max_new_tokens, temperature, top_p, top_k, seed, outputs_count=2)
    output_ids = register.add_stage(model, input_ids, sampling, outputs_count=1)
    text = register.add_stage(postprocess, output_ids, outputs_count=1)
    return text


def chat_preprocess(messages, max_tokens, temperature, top_p, seed):
    n = request_number(max_tokens, "max_tokens", int, DEFAULT_MAX_NEW_TOKENS)
    if not 1 <= n <= MAX_NEW_TOKENS_CAP:
        raise ValueError(f"max_tokens {n} is out of range [1, {MAX_NEW_TOKENS_CAP}] (the server cap)")
    return preprocess(None, messages, max_tokens, temperature, top_p, None, seed)


def chat_postprocess(input_ids, output_ids, sampling):
    """(text, prompt token ids, completion token ids, the token limit): the ids stream as rows, their counts are
    the usage; a completion as long as the limit finished on it ("length"), a shorter one on EOS."""
    ids = np.asarray(output_ids, dtype=np.int64).reshape(-1)
    limit = np.int64(np.asarray(sampling).reshape(-1)[0])
    return postprocess(ids), np.asarray(input_ids, dtype=np.int64).reshape(-1), ids, limit


# the OpenAI-compatible chat (``POST /v1/chat/completions``, see servable_framework/main/openai_api.py)
@register.register_method(output_names=["text", "prompt_tokens", "completion_tokens", "max_tokens"], stream=True)
def chat(messages, max_tokens=None, temperature=None, top_p=None, seed=None):
    input_ids, sampling = register.add_stage(
        chat_preprocess, messages, max_tokens, temperature, top_p, seed, outputs_count=2)
    output_ids = register.add_stage(model, input_ids, sampling, outputs_count=1)
    text, prompt_tokens, completion_tokens, limit = register.add_stage(chat_postprocess, input_ids, output_ids,
                                                                       sampling, outputs_count=4)
    return text, prompt_tokens, completion_tokens, limit
