"""Qwen2.5-VL model file for the generation engine (model code only: the engine in
``servable_framework/engine`` owns rows, the KV cache, sampling, streaming and stage-to-stage transfer).

Instance (stage-0 ranks receive them)::

    inputs : [input_ids      int   [T]     prompt token ids (chat template already applied),
              pixel_values   float [P, D]  patches from the Qwen2.5-VL image processor (P = 0: no image),
              image_grid_thw int   [I, 3]  one (t, h, w) row per image (I = 0: no image),
              sampling       float [5]     [max_new_tokens, temperature, top_p, top_k, seed]]
    output : [output_ids     int64 [n]     generated tokens, the stop (EOS) token excluded]

EOS: the checkpoint's ``generation_config.json`` ``eos_token_id`` list (shard option ``eos_token_id``
overrides). Videos are not supported.

Layout: rank r is in stage ``r // tp``. Stage 0 holds the vision tower and the token embedding (replicated
over its TP ranks); every stage holds its contiguous slice of decoder layers (Megatron TP inside the stage,
layers renumbered from 0); every TP rank of the last stage holds the final norm and its vocabulary block of
``lm_head``. Each rank reads only its slices of the checkpoint. Positions are Qwen2.5-VL's 3-D mRoPE
positions (the stock ``get_rope_index`` for the prompt; each row's next position + 1 per decode step).

Shard options (``declare_servable(shard_options=...)``): ``dtype`` (default: the checkpoint's),
``attn_implementation`` (``"sdpa"``, default, or ``"eager"``), ``eos_token_id`` (int or list).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from transformers import AutoConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLModel,
    Qwen2_5_VLRMSNorm,
    Qwen2_5_VLRotaryEmbedding,
    Qwen2_5_VLTextModel,
    Qwen2_5_VLVisionRotaryEmbedding,
)

from agents.qwen_parallel import check_tp_divisible, parallelize_decoder_layer_, special_ids
from servable_framework.agent.shard import InstanceValues, ShardContext, register_shard
from servable_framework.engine.checkpoint import CheckpointReader, load_module_, torch_dtype
from servable_framework.engine.kv_cache import CacheView
from servable_framework.engine.layers import VocabParallelHead, split_layers
from servable_framework.engine.model import EngineModel, KVShape, Prompt
from servable_framework.engine.sampling import SamplingParams
from servable_framework.engine.shard import EngineShard

_PREFIXES = {"text": ("model.language_model.", "model."), "vision": ("model.visual.", "visual.")}


class _MRopeIndex:
    """Carries what the stock ``Qwen2_5_VLModel.get_rope_index`` reads (``config`` and
    ``get_vision_position_ids``), so 3-D positions come from HF's own code without a full model object and
    without its shared ``rope_deltas`` attribute."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._get_rope_index = Qwen2_5_VLModel.get_rope_index
        self.get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids.__get__(self)

    def __call__(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                 image_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor:
        positions, _deltas = self._get_rope_index(
            self, input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            attention_mask=attention_mask)
        return positions  # [3, B, T]


class Qwen25VLModel(EngineModel):
    """One rank's slice of a tensor/pipeline-parallel Qwen2.5-VL (see the module docstring)."""

    def __init__(self, ctx: ShardContext) -> None:
        super().__init__(ctx)
        path = Path(ctx.model_files[0])
        self.config = AutoConfig.from_pretrained(path)
        tcfg = self.config.text_config
        check_tp_divisible(tcfg, ctx.tp_size)  # before any communication or loading
        if ctx.tp_size > 1 and ctx.tp_group is None:
            raise ValueError("tp_group is required when tensor-parallel size > 1")
        self.layers = split_layers(tcfg.num_hidden_layers, ctx.stage_size)[ctx.stage]
        self.device = torch.device(ctx.device)
        self.dtype = torch_dtype(ctx.options.get("dtype") or getattr(self.config, "dtype", None), torch.float32)
        self.attn_impl = str(ctx.options.get("attn_implementation", "sdpa"))
        self.eos_token_ids, self.pad_token_id = special_ids(path, tcfg, ctx.options.get("eos_token_id"))
        self.hidden_size, self.vocab_size = tcfg.hidden_size, tcfg.vocab_size
        head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
        self.kv = KVShape(self.layers[1] - self.layers[0], tcfg.num_key_value_heads // ctx.tp_size, head_dim)
        vcfg = self.config.vision_config
        self.patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
        self.merge_unit = vcfg.spatial_merge_size ** 2
        reader = CheckpointReader(path, _PREFIXES)
        try:
            self._build(reader)
        finally:
            reader.close()

    def _build(self, reader: CheckpointReader) -> None:
        ctx, first, a = self.ctx, self.ctx.is_first_stage, self.layers[0]
        tcfg = copy.deepcopy(self.config.text_config)  # this stage's text model: layers a..b as 0..n-1
        tcfg.layer_types = list(tcfg.layer_types[a:self.layers[1]])
        tcfg.num_hidden_layers = self.layers[1] - a
        tcfg._attn_implementation = self.attn_impl
        with torch.device("meta"):  # skeletons only; parameters come from the checkpoint below
            text = Qwen2_5_VLTextModel(tcfg)
        text.norm = nn.Identity()  # the final norm lives on the last stage, next to lm_head
        if not first:
            text.embed_tokens = nn.Identity()
        if ctx.tp_size > 1:
            for layer in text.layers:
                parallelize_decoder_layer_(layer, ctx.tp_size, ctx.tp_rank, ctx.tp_comm)

        def text_key(name: str) -> str:
            if name.startswith("layers."):
                idx, rest = name[len("layers."):].split(".", 1)
                return reader.key("text", f"layers.{int(idx) + a}.{rest}")
            return reader.key("text", name)

        load_module_(text, reader, text_key, self.device, self.dtype)
        text.rotary_emb = Qwen2_5_VLRotaryEmbedding(config=tcfg).to(self.device)  # non-persistent buffers
        self.text = text.eval()

        self.visual: nn.Module | None = None
        self.mrope: _MRopeIndex | None = None
        if first:
            vcfg = copy.deepcopy(self.config.vision_config)
            vcfg._attn_implementation = self.attn_impl
            with torch.device("meta"):
                visual = Qwen2_5_VisionTransformerPretrainedModel(vcfg)
            load_module_(visual, reader, lambda n: reader.key("vision", n), self.device, self.dtype)
            visual.rotary_pos_emb = Qwen2_5_VLVisionRotaryEmbedding(vcfg).to(self.device)
            self.visual = visual.eval()
            self.mrope = _MRopeIndex(self.config)

        self.final_norm: nn.Module | None = None
        self.lm_head: VocabParallelHead | None = None
        if ctx.is_last_stage:
            with torch.device("meta"):
                norm = Qwen2_5_VLRMSNorm(tcfg.hidden_size, eps=tcfg.rms_norm_eps)
                head = VocabParallelHead(tcfg.hidden_size, tcfg.vocab_size, ctx.tp_size, ctx.tp_rank, ctx.tp_comm)
            load_module_(norm, reader, lambda n: reader.key("text", f"norm.{n}"), self.device, self.dtype)
            head_key = "lm_head.weight"
            if head_key not in reader and self.config.tie_word_embeddings:
                head_key = reader.key("text", "embed_tokens.weight")
            load_module_(head, reader, lambda n: head_key, self.device, self.dtype)
            self.final_norm, self.lm_head = norm.eval(), head.eval()

        for name, tensor in self.tensors():
            if tensor.is_meta:
                raise RuntimeError(f"{name} was not materialised from the checkpoint")

    # ------------------------------------------------------------------ stage 0

    def parse(self, instance: InstanceValues) -> Prompt:
        if not isinstance(instance, (list, tuple)) or len(instance) != 4:
            raise ValueError("expected 4 inputs: input_ids, pixel_values, image_grid_thw, sampling")
        ids, pv, thw, opts = instance
        for name, v in (("input_ids", ids), ("pixel_values", pv), ("image_grid_thw", thw), ("sampling", opts)):
            if not isinstance(v, np.ndarray):
                raise ValueError(f"{name} must be a tensor, got {type(v).__name__}")
        assert isinstance(ids, np.ndarray) and isinstance(pv, np.ndarray) and isinstance(thw, np.ndarray)
        assert isinstance(opts, np.ndarray)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids must be a non-empty 1-D integer tensor, got {ids.dtype} {list(ids.shape)}")
        ids = ids.astype(np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"input_ids out of range [0, {self.vocab_size})")
        if int((ids == self.config.video_token_id).sum()):
            raise ValueError("video inputs are not supported")
        n_image_tokens = int((ids == self.config.image_token_id).sum())
        extras: dict[str, Any] = {}
        if pv.size == 0 and thw.size == 0:
            if n_image_tokens:
                raise ValueError(f"{n_image_tokens} image tokens in input_ids but no pixel_values")
        else:
            if pv.ndim != 2 or pv.shape[1] != self.patch_dim or pv.dtype.kind != "f":
                raise ValueError(f"pixel_values must be float [P, {self.patch_dim}], got {pv.dtype} {list(pv.shape)}")
            if thw.ndim != 2 or thw.shape[1] != 3 or thw.dtype.kind not in "iu" or thw.shape[0] == 0:
                raise ValueError(f"image_grid_thw must be integer [I, 3], got {thw.dtype} {list(thw.shape)}")
            thw = thw.astype(np.int64)
            patches = int(np.prod(thw, axis=1).sum())
            merge = self.config.vision_config.spatial_merge_size
            if (thw <= 0).any() or (thw[:, 1:] % merge).any():
                raise ValueError(f"image_grid_thw rows must be positive with h and w divisible by "
                                 f"{merge}, got {thw.tolist()}")
            if patches != pv.shape[0]:
                raise ValueError(f"image_grid_thw describes {patches} patches but pixel_values has {pv.shape[0]}")
            if patches != n_image_tokens * self.merge_unit:
                raise ValueError(f"input_ids has {n_image_tokens} image tokens but the images need "
                                 f"{patches // self.merge_unit}")
            extras = {"pixel_values": pv.astype(np.float32), "image_grid_thw": thw}
        return Prompt(ids, SamplingParams.from_vector(opts), extras)

    def embed_prefill(self, prompts: list[Prompt], input_ids: torch.Tensor, valid: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.mrope is not None and self.visual is not None
        embeds = self.text.embed_tokens(input_ids)
        images = [p.extras for p in prompts if p.extras]
        grid = None
        if images:
            pixels = torch.from_numpy(np.concatenate([x["pixel_values"] for x in images])).to(self.device, self.dtype)
            grid = torch.from_numpy(np.concatenate([x["image_grid_thw"] for x in images])).to(self.device)
            feats = self.visual(pixels, grid_thw=grid).pooler_output
            image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(image_mask, feats.to(embeds.dtype))
        mm_token_type_ids = (input_ids == self.config.image_token_id).long()
        positions = self.mrope(input_ids, mm_token_type_ids, grid, valid)
        # decode positions: one past the largest prompt position of each row (= length + rope delta)
        return embeds, positions, positions.amax(dim=(0, 2)) + 1

    def embed_decode(self, tokens: torch.Tensor, next_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text.embed_tokens(tokens.view(-1, 1)), next_positions.view(1, -1, 1).expand(3, -1, -1)

    # ------------------------------------------------------------------ every stage

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, cache: CacheView) -> torch.Tensor:
        mask = cache.mask_for(self.attn_impl, hidden.dtype)
        pos_emb = self.text.rotary_emb(hidden, positions)
        for layer in self.text.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=pos_emb, cache=cache)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        assert self.final_norm is not None and self.lm_head is not None
        return self.lm_head(self.final_norm(hidden))



@register_shard("qwen2_5_vl")
class Qwen25VLShard(EngineShard):
    model_class = Qwen25VLModel
