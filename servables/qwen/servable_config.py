"""The `qwen` servable: Qwen2.5-VL (image + text -> text) with the model split over distributed Agents.

Preprocess (chat template, ``qwen_vl_utils.process_vision_info``, the Qwen2.5-VL processor) and postprocess
(decode) run in the Worker; generation runs on the Agents (``agents/qwen2_5_vl.py``: TP inside a stage,
pipeline stages across). Method ``predict``; every input but one of ``prompt`` / ``messages`` is optional::

    {"instances": [{"prompt": "Describe the image.", "image": {"b64": "<png or jpeg bytes>"},
                    "max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "seed": 1}]}
    {"instances": [{"messages": "[{\\"role\\": \\"user\\", \\"content\\": [{\\"type\\": \\"text\\", ...}]}]"}]}
    -> {"instances": [{"text": "..."}]}

``messages`` is a JSON string of OpenAI-style chat messages; image parts are ``{"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}`` (only ``data:`` URLs: the server never reads files or
the network on a client's behalf). Greedy decoding unless ``temperature > 0``.

Method ``chat`` (streaming) is the OpenAI-compatible chat (``POST /v1/chat/completions`` with ``"model": "qwen"``,
see servable_framework/main/openai_api.py): inputs ``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``;
outputs ``text``, ``prompt_tokens`` and ``completion_tokens`` (the token ids; their counts are the usage).

Deployment knobs (environment, read when this file is imported by the Worker):
``QWEN_CHECKPOINT`` (default: the tiny offline model, built on first use under ``tiny_models/``),
``QWEN_RANK_SIZE`` (2), ``QWEN_STAGE_SIZE`` (1), ``QWEN_MAX_NEW_TOKENS`` (default 64),
``QWEN_MAX_NEW_TOKENS_CAP`` (512), ``QWEN_MAX_BATCH_SIZE`` (8), ``QWEN_MAX_BATCH_DELAY_MS`` (5),
``QWEN_MAX_MODEL_LEN`` (default: the checkpoint's ``max_position_embeddings``; a prompt (image tokens included)
whose length plus ``max_new_tokens`` is over it gets a 400 before it reaches the Agents),
``QWEN_MAX_IMAGE_PIXELS`` (4096 x 4096: a larger image is refused with a 400 before it is decoded; a smaller one
above the processor's ``max_pixels`` is resized down by the processor, as Qwen does),
``QWEN_CONTINUOUS_BATCHING`` (1, the default: a request that arrives while a batch decodes joins it as rows free
up, so a short request behind a long one is answered in a few steps; on the 2-core CPU benchmark its throughput
at concurrency 8 is 0.91-1.12x that of static batching, see bench/bench_batching.py; 0: it waits for the running
batch to finish).
"""

import io
import json
import os
from pathlib import Path

import numpy as np

from servable_framework.engine.checkpoint import context_length
from servable_framework.engine.sampling import check_fits_context, request_number, sampling_vector
from servable_framework.server import distributed, register

from .tiny_model import build_tiny_qwen
from .vision_compat import load_processor, process_vision_info

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = os.environ.get("QWEN_CHECKPOINT") or str(build_tiny_qwen(REPO / "tiny_models"))
DEFAULT_MAX_NEW_TOKENS = int(os.environ.get("QWEN_MAX_NEW_TOKENS", "64"))
MAX_NEW_TOKENS_CAP = int(os.environ.get("QWEN_MAX_NEW_TOKENS_CAP", "512"))
CONTEXT = context_length(CHECKPOINT, int(os.environ.get("QWEN_MAX_MODEL_LEN", "0")) or None)
# decoding an image costs memory by its pixel count, however small its file: refuse huge ones before decoding
MAX_IMAGE_PIXELS = int(os.environ.get("QWEN_MAX_IMAGE_PIXELS", str(4096 * 4096)))

processor = load_processor(CHECKPOINT)
# the processor resizes every image to at most this many pixels (Qwen's smart_resize), keeping its aspect ratio
MAX_PIXELS = getattr(processor.image_processor.size, "longest_edge", None) or processor.image_processor.max_pixels
# resolve qwen_vl_utils now, at load time, not inside concurrent first requests
process_vision_info([{"role": "user", "content": [{"type": "text", "text": "warm-up"}]}])

model = distributed.declare_servable(
    rank_size=int(os.environ.get("QWEN_RANK_SIZE", "2")),
    stage_size=int(os.environ.get("QWEN_STAGE_SIZE", "1")),
    with_batch_dim=True,
    shard="qwen2_5_vl",
    max_batch_size=int(os.environ.get("QWEN_MAX_BATCH_SIZE", "8")),
    max_batch_delay_ms=float(os.environ.get("QWEN_MAX_BATCH_DELAY_MS", "5")),
    continuous_batching=os.environ.get("QWEN_CONTINUOUS_BATCHING", "1") == "1",
)


def _image(data):
    from PIL import Image, UnidentifiedImageError

    raw = data.tobytes() if isinstance(data, np.ndarray) else data
    try:
        img = Image.open(io.BytesIO(raw))  # reads the header only
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"'image' is not a valid PNG/JPEG image: {exc}") from None
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"'image' is {width}x{height} = {width * height} pixels, over this server's cap of "
                         f"{MAX_IMAGE_PIXELS} (QWEN_MAX_IMAGE_PIXELS); send a smaller image (the model sees at most "
                         f"{MAX_PIXELS} pixels: larger images are resized down to that)")
    try:
        img.load()  # decode now: a truncated file fails here, not later in the processor
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"'image' is not a valid PNG/JPEG image: {exc}") from None
    return img.convert("RGB")


def _messages_from_json(text):
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
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ValueError("message 'content' must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "image"):
                url = part.get("image_url", {}).get("url") if kind == "image_url" else part.get("image")
                if not isinstance(url, str) or not url.startswith("data:image"):
                    raise ValueError("image parts must carry a data:image/...;base64 URL")
                import base64

                try:
                    raw = base64.b64decode(url.split(",", 1)[1], validate=True)
                except (IndexError, ValueError):
                    raise ValueError("image data URL is not valid base64") from None
                parts.append({"type": "image", "image": _image(raw)})
            else:
                raise ValueError(f"unsupported message part {str(part)[:80]}")
        out.append({"role": msg["role"], "content": parts})
    return out


def preprocess(prompt, image, messages, max_new_tokens, temperature, top_p, top_k, seed):
    """Chat template + vision info + processor -> (input_ids, pixel_values, image_grid_thw, sampling)."""
    if messages is not None:
        if prompt is not None or image is not None:
            raise ValueError("give either 'messages' or 'prompt' (+ 'image'), not both")
        if not isinstance(messages, str):
            raise ValueError("'messages' must be a JSON string")
        chat = _messages_from_json(messages)
    elif prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("'prompt' must be a non-empty string")
        content = ([{"type": "image", "image": _image(image)}] if image is not None else [])
        chat = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
    else:
        raise ValueError("missing input: give 'prompt' (and optionally 'image') or 'messages'")
    sampling = sampling_vector(max_new_tokens, temperature, top_p, top_k, seed,
                               default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS, max_new_tokens_cap=MAX_NEW_TOKENS_CAP)
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    image_inputs = process_vision_info(chat)[0]
    inputs = processor(text=[text], images=image_inputs, return_tensors="np")
    check_fits_context(len(inputs["input_ids"][0]), sampling, CONTEXT)
    pixel_values = inputs.get("pixel_values")
    grid = inputs.get("image_grid_thw")
    patch_dim = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch (for an empty tensor's shape only)
    return (np.asarray(inputs["input_ids"][0], dtype=np.int64),
            np.zeros((0, patch_dim), np.float32) if pixel_values is None else np.asarray(pixel_values, np.float32),
            np.zeros((0, 3), np.int64) if grid is None else np.asarray(grid, np.int64),
            sampling)


def postprocess(output_ids):
    return processor.tokenizer.decode(np.asarray(output_ids).tolist(), skip_special_tokens=True)


@register.register_method(output_names=["text"], stream=True)
def predict(prompt=None, image=None, messages=None, max_new_tokens=None, temperature=None, top_p=None, top_k=None,
            seed=None):
    input_ids, pixel_values, grid, sampling = register.add_stage(
        preprocess, prompt, image, messages, max_new_tokens, temperature, top_p, top_k, seed, outputs_count=4)
    output_ids = register.add_stage(model, input_ids, pixel_values, grid, sampling, outputs_count=1)
    text = register.add_stage(postprocess, output_ids, outputs_count=1)
    return text


def chat_preprocess(messages, max_tokens, temperature, top_p, seed):
    n = request_number(max_tokens, "max_tokens", int, DEFAULT_MAX_NEW_TOKENS)
    if not 1 <= n <= MAX_NEW_TOKENS_CAP:
        raise ValueError(f"max_tokens {n} is out of range [1, {MAX_NEW_TOKENS_CAP}] (the server cap)")
    return preprocess(None, None, messages, max_tokens, temperature, top_p, None, seed)


def chat_postprocess(input_ids, output_ids, sampling):
    """(text, prompt token ids, completion token ids, the token limit): the ids stream as rows, their counts are
    the usage; a completion as long as the limit finished on it ("length"), a shorter one on EOS."""
    ids = np.asarray(output_ids, dtype=np.int64).reshape(-1)
    limit = np.int64(np.asarray(sampling).reshape(-1)[0])
    return postprocess(ids), np.asarray(input_ids, dtype=np.int64).reshape(-1), ids, limit


# the OpenAI-compatible chat (``POST /v1/chat/completions``, see servable_framework/main/openai_api.py)
@register.register_method(output_names=["text", "prompt_tokens", "completion_tokens", "max_tokens"], stream=True)
def chat(messages, max_tokens=None, temperature=None, top_p=None, seed=None):
    input_ids, pixel_values, grid, sampling = register.add_stage(
        chat_preprocess, messages, max_tokens, temperature, top_p, seed, outputs_count=4)
    output_ids = register.add_stage(model, input_ids, pixel_values, grid, sampling, outputs_count=1)
    text, prompt_tokens, completion_tokens, limit = register.add_stage(chat_postprocess, input_ids, output_ids,
                                                                       sampling, outputs_count=4)
    return text, prompt_tokens, completion_tokens, limit
