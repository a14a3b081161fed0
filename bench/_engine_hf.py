"""Hugging Face baseline of bench/bench_engine.py: ``Qwen2_5_VLForConditionalGeneration.generate()`` in one
process, no serving framework.

    python bench/_engine_hf.py --ckpt DIR [--build SHAPE] --device cpu|cuda --threads N --prompts FILE.json \
        --tokens 64 --repeats 5 --batch-repeats 3 --out OUT.json

``--build SHAPE``: build the random-weight checkpoint first (bench/_engine_model.py) on ``--device`` and
measure that model as built (on a GPU: no 15 GB read back from disk); an existing complete build is loaded
instead. Each measured call does what one served request does: chat template + tokenizer, greedy
``generate()``, decode. Batch 1 (the first prompt): ``T(1)`` and ``T(N)`` interleaved, ``--repeats`` each;
batch B (the first B prompts, left-padded): the same, ``--batch-repeats`` each. Writes OUT.json with the
samples (seconds), generated token counts (EOS would make them shorter), the texts and the model's dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root


def chat_text(processor: Any, prompt: str) -> str:
    """The servable's chat template applied to a text-only user prompt (what its preprocess tokenizes)."""
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    return str(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--build", help="build this shape of bench/_engine_model.py first, unless already built")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    ap.add_argument("--prompts", required=True, help="JSON list of prompts")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if min(a.repeats, a.batch_repeats) < 1:
        ap.error("--repeats and --batch-repeats must be >= 1")

    import torch

    torch.set_num_threads(a.threads)
    from transformers import Qwen2_5_VLForConditionalGeneration

    from bench._engine_model import build, is_complete
    from servables.qwen.vision_compat import load_processor

    t0 = time.perf_counter()
    if a.build and not is_complete(Path(a.ckpt)):
        model, built = build(a.build, Path(a.ckpt), a.device), True
    else:
        model, built = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            a.ckpt, dtype="auto", attn_implementation="sdpa", device_map=a.device).eval(), False
    load_s = time.perf_counter() - t0
    processor = load_processor(a.ckpt)
    processor.tokenizer.padding_side = "left"
    prompts: list[str] = json.loads(Path(a.prompts).read_text())
    eos_ids = model.generation_config.eos_token_id
    eos = set(eos_ids if isinstance(eos_ids, list) else [] if eos_ids is None else [eos_ids])

    def call(batch: list[str], n: int) -> tuple[float, list[list[int]], list[str]]:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        enc = processor(text=[chat_text(processor, p) for p in batch], padding=True, return_tensors="pt").to(a.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=n, do_sample=False)
        new = out[:, enc["input_ids"].shape[1]:].tolist()  # .tolist() waits for the device
        texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return time.perf_counter() - t, new, texts

    n = a.tokens

    def measure(batch: list[str], repeats: int) -> tuple[dict[str, list[float]], list[list[int]], list[str]]:
        call(batch, 2)  # warm-up at this batch shape (first-call allocations, kernels)
        call(batch, n)
        samples: dict[str, list[float]] = {"1": [], str(n): []}
        for _ in range(repeats):
            for k in (1, n):
                s, tokens, texts = call(batch, k)
                samples[str(k)].append(s)
        return samples, tokens, texts

    single, single_tokens, single_texts = measure(prompts[:1], a.repeats)
    batch, batch_tokens, batch_texts = measure(prompts[:a.batch], a.batch_repeats)
    result = {
        "threads": torch.get_num_threads(), "device": a.device, "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation, "built_here": built, "load_s": load_s,
        "tokens": n, "single_s": single, "batch": a.batch, "batch_s": batch,
        "new_tokens": [len([t for t in row if t not in eos]) for row in single_tokens + batch_tokens],
        "single_text": single_texts[0], "batch_texts": batch_texts,
        "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
    }
    Path(a.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
