"""Build a tiny, randomly initialised Qwen2.5-VL checkpoint plus processor files, fully offline.

``build_tiny_qwen(out_dir)`` writes ``out_dir/tiny-qwen25vl`` (config.json, generation_config.json,
model.safetensors, tokenizer files, chat template, preprocessor_config.json) and returns that path.
It is deterministic (fixed seeds, embedded training corpus) and idempotent: a finished build leaves a
marker file, and a second call returns the existing directory. CLI::

    python -m servables.qwen.tiny_model OUT_DIR

Sizes are chosen so every parallel layout the tests use works: text hidden 128, 8 attention heads
(head_dim 16, ``mrope_section`` [2, 3, 3] sums to head_dim/2), 4 KV heads (grouped-query attention),
intermediate 256, 4 layers -> tensor parallel 1/2/4 and pipeline 2 x TP 2 are valid; TP 8 is not
(4 KV heads). Vision tower: depth 2, hidden 32, 2 heads, window attention + one full-attention block.

The tokenizer is a byte-level BPE trained in milliseconds on an embedded corpus with Qwen2's
pre-tokenizer, then the Qwen2.5-VL special tokens in Qwen's order; the image processor is the
PIL-backed ``Qwen2VLImageProcessorPil`` (no torchvision needed). Weights never go into the repo.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

MODEL_DIR_NAME = "tiny-qwen25vl"
MARKER = ".tiny_qwen_complete"
BUILD_VERSION = "2"  # bump when the recipe changes: an old build is then rebuilt

# Same names and order as the real Qwen2.5-VL tokenizer (ids follow the small vocab).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]

PRETOKENIZE_REGEX = (  # Qwen2's pre-tokenizer split
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2-VL / Qwen2.5-VL chat template (default system prompt, image/video placeholders).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Describe this image. What is in the picture? A red square on a white background.",
    "You are a helpful assistant. Answer the question briefly and accurately.",
    "Tensor parallel inference splits each weight matrix across devices; pipeline parallel splits layers.",
    "Hello, world! 1234567890 user assistant system image video text",
] * 20

# min/max pixels of the image processor: a 96x64 image becomes 84x56 -> grid (1, 4, 6) -> 6 image tokens.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 16


def _build_tokenizer(vocab_size: int = 512):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model_json["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|endoftext|>",  # switched to <|im_end|> below; keeps the specials in Qwen's order
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"extra_special_tokens": SPECIAL_TOKENS}, replace_extra_special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _write_checkpoint(dst: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    padded_vocab = (len(tok) + 63) // 64 * 64  # like real checkpoints: embedding rows > len(tokenizer)

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=padded_vocab,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            # wider than the default 0.02: the random model then gives varied, well-separated greedy
            # tokens instead of repeating one token, which keeps decoding tests meaningful
            initializer_range=0.1,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=128,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            initializer_range=0.1,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        # Keep logits O(5) rather than O(20) (greedy tokens are unchanged: argmax is scale-invariant),
        # so float32 rounding noise stays well below the tests' absolute 1e-5 logit tolerance.
        model.lm_head.weight.mul_(0.25)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2
    ).save_pretrained(dst)
    # The chat template as its own file too: stock processors and tokenizers both pick it up.
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def build_tiny_qwen(out_dir: Path) -> Path:
    """Build (once) the tiny Qwen2.5-VL checkpoint under ``out_dir`` and return its directory."""
    out_dir = Path(out_dir)
    dst = out_dir / MODEL_DIR_NAME
    marker = dst / MARKER
    if marker.is_file() and marker.read_text().strip() == BUILD_VERSION:
        return dst
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build next to the target, then rename: a crashed or concurrent build never leaves a half directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-", dir=out_dir))
    tmp.chmod(0o755)
    try:
        _write_checkpoint(tmp)
        (tmp / MARKER).write_text(BUILD_VERSION + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        try:
            os.replace(tmp, dst)
        except OSError:  # another builder won the race
            if not (marker.is_file() and marker.read_text().strip() == BUILD_VERSION):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m servables.qwen.tiny_model OUT_DIR", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(build_tiny_qwen(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
