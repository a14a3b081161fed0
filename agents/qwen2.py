"""Qwen2 / Qwen2.5 text-only model file (``Qwen2ForCausalLM``) for the generation engine (model code only: the
engine in ``servable_framework/engine`` owns rows, the KV cache, sampling, streaming and stage-to-stage transfer).

Instance (stage-0 ranks receive them)::

    inputs : [input_ids  int   [T]  prompt token ids (chat template already applied),
              sampling   float [5]  [max_new_tokens, temperature, top_p, top_k, seed]]
    output : [output_ids int64 [n]  generated tokens, the stop (EOS) token excluded]

EOS: the checkpoint's ``generation_config.json`` ``eos_token_id`` (shard option ``eos_token_id`` overrides).

Layout: rank r is in stage ``r // tp``. Stage 0 holds the token embedding (replicated over its TP ranks); every
stage holds its contiguous slice of decoder layers (Megatron TP inside the stage: q/k/v and gate/up
column-parallel, o and down row-parallel; layers renumbered from 0); every TP rank of the last stage holds the
final norm and its vocabulary block of the output head (``lm_head.weight``, or the embedding matrix when the
checkpoint ties them and has no ``lm_head.weight``). Each rank reads only its slices of the checkpoint. The
Hugging Face ``Qwen2DecoderLayer`` runs as is, with the engine's cache and mask. Positions are 1-D: a prompt's
real tokens count from 0 whatever its left padding (as ``generate()`` numbers them), then + 1 per decode step.

Shard options (``declare_servable(shard_options=...)``): ``dtype`` (default: the checkpoint's),
``attn_implementation`` (``"sdpa"``, default, or ``"eager"``), ``eos_token_id`` (int or list).
Sliding-window attention (``use_sliding_window``) is not supported (Qwen2.5 checkpoints leave it off).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from transformers import AutoConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from agents.qwen_parallel import check_tp_divisible, parallelize_decoder_layer_, special_ids
from servable_framework.agent.shard import InstanceValues, ShardContext, register_shard
from servable_framework.engine.checkpoint import CheckpointReader, load_module_, torch_dtype
from servable_framework.engine.kv_cache import CacheView
from servable_framework.engine.layers import VocabParallelHead, split_layers
from servable_framework.engine.model import EngineModel, KVShape, Prompt
from servable_framework.engine.sampling import SamplingParams
from servable_framework.engine.shard import EngineShard

_PREFIXES = {"text": ("model.",)}


class Qwen2Model(EngineModel):
    """One rank's slice of a tensor/pipeline-parallel Qwen2 / Qwen2.5 (see the module docstring)."""

    def __init__(self, ctx: ShardContext) -> None:
        super().__init__(ctx)
        path = Path(ctx.model_files[0])
        self.config = AutoConfig.from_pretrained(path)
        cfg = self.config
        if getattr(cfg, "model_type", None) != "qwen2":
            raise ValueError(f"{path} is a '{getattr(cfg, 'model_type', None)}' checkpoint, not qwen2 "
                             f"(Qwen2ForCausalLM)")
        check_tp_divisible(cfg, ctx.tp_size)  # before any communication or loading
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
            raise ValueError("sliding-window attention (use_sliding_window) is not supported")
        if ctx.tp_size > 1 and ctx.tp_group is None:
            raise ValueError("tp_group is required when tensor-parallel size > 1")
        self.layers = split_layers(cfg.num_hidden_layers, ctx.stage_size)[ctx.stage]
        self.device = torch.device(ctx.device)
        self.dtype = torch_dtype(ctx.options.get("dtype") or getattr(cfg, "dtype", None), torch.float32)
        self.attn_impl = str(ctx.options.get("attn_implementation", "sdpa"))
        self.eos_token_ids, self.pad_token_id = special_ids(path, cfg, ctx.options.get("eos_token_id"))
        self.hidden_size, self.vocab_size = cfg.hidden_size, cfg.vocab_size
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv = KVShape(self.layers[1] - self.layers[0], cfg.num_key_value_heads // ctx.tp_size, head_dim)
        reader = CheckpointReader(path, _PREFIXES)
        try:
            self._build(reader)
        finally:
            reader.close()

    def _build(self, reader: CheckpointReader) -> None:
        ctx, (a, b) = self.ctx, self.layers
        cfg = copy.deepcopy(self.config)  # this stage's layers a..b as 0..n-1 (their cache index)
        cfg.num_hidden_layers = b - a
        cfg.layer_types = list(cfg.layer_types[a:b])
        cfg._attn_implementation = self.attn_impl
        with torch.device("meta"):  # skeletons only; parameters come from the checkpoint below
            layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(b - a))
        if ctx.tp_size > 1:
            for layer in layers:
                parallelize_decoder_layer_(layer, ctx.tp_size, ctx.tp_rank, ctx.tp_comm)

        def layer_key(name: str) -> str:
            idx, rest = name.split(".", 1)
            return reader.key("text", f"layers.{int(idx) + a}.{rest}")

        load_module_(layers, reader, layer_key, self.device, self.dtype)
        self.decoder = layers.eval()
        self.rotary = Qwen2RotaryEmbedding(config=cfg).to(self.device)  # non-persistent buffers, not loaded

        self.embed: nn.Embedding | None = None
        if ctx.is_first_stage:
            with torch.device("meta"):
                embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            load_module_(embed, reader, lambda n: reader.key("text", f"embed_tokens.{n}"), self.device, self.dtype)
            self.embed = embed.eval()

        self.final_norm: nn.Module | None = None
        self.lm_head: VocabParallelHead | None = None
        if ctx.is_last_stage:
            with torch.device("meta"):
                norm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
                head = VocabParallelHead(cfg.hidden_size, cfg.vocab_size, ctx.tp_size, ctx.tp_rank, ctx.tp_comm)
            load_module_(norm, reader, lambda n: reader.key("text", f"norm.{n}"), self.device, self.dtype)
            head_key = "lm_head.weight"
            if head_key not in reader:
                if not getattr(self.config, "tie_word_embeddings", False):
                    raise KeyError(f"tensor 'lm_head.weight' not found in checkpoint {reader.path} "
                                   f"(and tie_word_embeddings is off)")
                head_key = reader.key("text", "embed_tokens.weight")  # tied: the head reads the embedding rows
            load_module_(head, reader, lambda n: head_key, self.device, self.dtype)
            self.final_norm, self.lm_head = norm.eval(), head.eval()

        for name, tensor in self.tensors():
            if tensor.is_meta:
                raise RuntimeError(f"{name} was not materialised from the checkpoint")

    # ------------------------------------------------------------------ stage 0

    def parse(self, instance: InstanceValues) -> Prompt:
        if not isinstance(instance, (list, tuple)) or len(instance) != 2:
            raise ValueError("expected 2 inputs: input_ids, sampling")
        ids, opts = instance
        for name, v in (("input_ids", ids), ("sampling", opts)):
            if not isinstance(v, np.ndarray):
                raise ValueError(f"{name} must be a tensor, got {type(v).__name__}")
        assert isinstance(ids, np.ndarray) and isinstance(opts, np.ndarray)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids must be a non-empty 1-D integer tensor, got {ids.dtype} {list(ids.shape)}")
        ids = ids.astype(np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"input_ids out of range [0, {self.vocab_size})")
        return Prompt(ids, SamplingParams.from_vector(opts))

    def embed_prefill(self, prompts: list[Prompt], input_ids: torch.Tensor, valid: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.embed is not None
        # as generate(): real tokens count from 0 after the left padding; padding positions are never read
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        return self.embed(input_ids), positions, valid.long().sum(-1)

    def embed_decode(self, tokens: torch.Tensor, next_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.embed is not None
        return self.embed(tokens.view(-1, 1)), next_positions.view(-1, 1)

    # ------------------------------------------------------------------ every stage

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, cache: CacheView) -> torch.Tensor:
        mask = cache.mask_for(self.attn_impl, hidden.dtype)
        pos_emb = self.rotary(hidden, positions)
        for layer in self.decoder:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=pos_emb, cache=cache)
        return hidden

    # ------------------------------------------------------------------ last stage

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        assert self.final_norm is not None and self.lm_head is not None
        return self.lm_head(self.final_norm(hidden))


@register_shard("qwen2")
class Qwen2Shard(EngineShard):
    model_class = Qwen2Model
