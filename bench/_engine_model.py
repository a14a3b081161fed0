"""Random-weight Qwen2.5-VL checkpoints of real model shapes for bench/bench_engine.py, built offline.

Two shapes (text dimensions as in the real checkpoints' config.json; a small vision tower, since the benchmark
prompts are text-only):

* ``3b-4l``: Qwen2.5-VL-3B (hidden 2048, 16 heads, 2 KV heads, intermediate 11008, vocabulary 151936, tied
  embeddings) cut to 4 decoder layers; built on the CPU;
* ``7b``: Qwen2.5-VL-7B (hidden 3584, 28 heads, 4 KV heads, intermediate 18944, vocabulary 152064, all 28
  layers, untied ``lm_head``); built on the GPU.

Both are stored in bfloat16 (what the real checkpoints store), seeded, with the tokenizer, chat template and
image processor files of the tiny offline model (``servables/qwen/tiny_model.py``: a ~530-token byte-level BPE
with Qwen's special tokens). The embedding matrix keeps the real vocabulary size; ids past the tokenizer are
padding rows, as in the real checkpoints. The ``lm_head`` rows of those padding ids and of every special token
are zero, so their logit is exactly 0 while the largest of the ~510 random text-token logits is positive:
greedy decoding never emits EOS (every request runs to ``max_new_tokens``) and every generated token is an
ordinary text token (the decoded text has one piece per token; nothing is skipped as special). The
matrices keep their full size, so the work per token is that of the real shape.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

RECIPE = "1"  # bump when the recipe changes: an old build is then rebuilt
MARKER = ".bench_engine_complete"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "servable_framework" / "bench"

SHAPES: dict[str, dict[str, Any]] = {
    "3b-4l": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 4,
              "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "7b": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json")


def is_complete(path: Path) -> bool:
    marker = Path(path) / MARKER
    return marker.is_file() and marker.read_text().strip() == RECIPE


def _config(shape: str, tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig

    dims = dict(SHAPES[shape])
    tie = dims.pop("tie_word_embeddings")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    return Qwen2_5_VLConfig(
        text_config=dict(
            **dims, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=tie,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                           out_hidden_size=dims["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )


def build(shape: str, dst: Path, device: str = "cpu", seed: int = 0) -> Any:
    """Build the ``shape`` model on ``device`` (bf16, seeded), save it with the tiny model's tokenizer and
    processor files to ``dst`` (written beside it, then renamed) and return the model, in eval mode."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from servables.qwen.tiny_model import build_tiny_qwen

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tiny = build_tiny_qwen(dst.parent / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = _config(shape, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    keep = torch.zeros(config.text_config.vocab_size, dtype=torch.bool, device=device)
    keep[:len(tokenizer)] = True
    keep[sorted({*tokenizer.all_special_ids, *tokenizer.get_added_vocab().values()})] = False
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0  # never emitted by greedy decoding (see the module docstring)
    im_end, endoftext = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(eos_token_id=[im_end, endoftext], pad_token_id=endoftext,
                                               bos_token_id=endoftext, do_sample=False)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        model.save_pretrained(tmp)
        for f in tiny.iterdir():
            if f.is_file() and f.name not in WEIGHT_FILES and not f.name.startswith("."):
                shutil.copy(f, tmp / f.name)
        (tmp / MARKER).write_text(RECIPE + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def param_count(shape: str) -> int:
    """Parameters of the text model of ``shape`` (lm_head counted once when tied; vision tower excluded)."""
    d = SHAPES[shape]
    h, i, n, kv = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["num_key_value_heads"]
    kv_dim = kv * h // d["num_attention_heads"]
    layer = h * h * 2 + 2 * h * kv_dim + h + 2 * kv_dim + 3 * h * i + 2 * h
    return d["vocab_size"] * h * (1 if d["tie_word_embeddings"] else 2) + n * layer + h
