"""Build a tiny, randomly initialised Qwen2.5 text-only checkpoint (``Qwen2ForCausalLM``), fully offline.

``build_tiny_qwen_text(out_dir)`` writes ``out_dir/tiny-qwen25-text`` (config.json, generation_config.json,
model.safetensors, tokenizer files, chat template) and returns that path. It is deterministic (fixed seed,
the tokenizer trained on the embedded corpus of ``servables/qwen/tiny_model.py``) and idempotent: a finished
build leaves a marker file, and a second call returns the existing directory. CLI::

    python -m servables.qwen_text.tiny_model OUT_DIR

Sizes are chosen so every parallel layout the tests use works and differs from the Qwen2.5-VL tiny model where
that tests something: hidden 128, 8 attention heads (head_dim 16), 4 KV heads (grouped-query attention),
intermediate 256 -> tensor parallel 1/2/4 are valid, TP 8 is not (4 KV heads); **3** decoder layers, so
pipeline 2 x TP 2 splits them unevenly (2 + 1); tied input/output embeddings (as Qwen2.5-0.5B/1.5B/3B: no
``lm_head.weight`` in the checkpoint). Plain 1-D RoPE (no mRoPE), q/k/v with biases.

The tokenizer is the tiny Qwen2.5-VL one (byte-level BPE with Qwen2's pre-tokenizer and the Qwen2.5 special
tokens in Qwen's order, built offline in milliseconds), with Qwen2.5's text-only chat template. Weights never
go into the repo.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

MODEL_DIR_NAME = "tiny-qwen25-text"
MARKER = ".tiny_qwen_text_complete"
BUILD_VERSION = "1"  # bump when the recipe changes: an old build is then rebuilt

# Qwen2.5's chat template for plain text messages (no tools): the default system prompt unless the first
# message is a system message. Expression strings only, so no Jinja whitespace control is needed.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _vl_tiny_model() -> ModuleType:
    """``servables/qwen/tiny_model.py`` (its tokenizer recipe), loaded by path: the Worker imports this file as
    ``qwen_text.tiny_model`` with ``servables/`` (not the repository root) on ``sys.path``."""
    name = "_servables_qwen_tiny_model"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "qwen" / "tiny_model.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _build_tokenizer() -> Any:
    tok = _vl_tiny_model()._build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _write_checkpoint(dst: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = _build_tokenizer()
    endoftext, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    padded_vocab = (len(tok) + 63) // 64 * 64  # like real checkpoints: embedding rows > len(tokenizer)
    config = Qwen2Config(
        vocab_size=padded_vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
        tie_word_embeddings=True,
        # wider than the default 0.02: the random model then gives varied, well-separated greedy tokens
        # instead of repeating one token, which keeps decoding tests meaningful
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        # Halve the (tied) embedding, and so the logits: O(2.5) rather than O(5) (the greedy tokens stay varied),
        # so float32 rounding noise stays well below the tests' absolute 1e-5 logit tolerance.
        model.model.embed_tokens.weight.mul_(0.5)
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
        bos_token_id=endoftext,
        do_sample=False,
    )
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def build_tiny_qwen_text(out_dir: str | Path) -> Path:
    """Build (once) the tiny Qwen2.5 text checkpoint under ``out_dir`` and return its directory."""
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
        print("usage: python -m servables.qwen_text.tiny_model OUT_DIR", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(build_tiny_qwen_text(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
