"""Qwen-family pieces shared by the Qwen2.5-VL and Qwen2.5 model files: the tensor-parallel split of a decoder
layer, the divisibility check, and the EOS / padding ids of a checkpoint.

Qwen2 and Qwen2.5-VL decoder layers share their names (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``),
so one function parallelises both (Megatron: q/k/v and gate/up column-parallel, o and down row-parallel).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch.nn as nn

from servable_framework.engine.checkpoint import generation_config
from servable_framework.engine.collectives import TPComm
from servable_framework.engine.layers import ColumnParallelLinear, RowParallelLinear, block


def parallelize_decoder_layer_(layer: nn.Module, tp_size: int, tp_rank: int, comm: TPComm) -> None:
    """Swap one decoder layer's attention/MLP linears for this rank's parallel shards.

    Works on a meta-device skeleton (the new parameters are empty until the loader fills them). The attention
    reshapes with ``view(..., -1, head_dim)``, so the local head counts follow from the shard sizes;
    ``num_key_value_groups`` is unchanged because both head counts divide by tp.
    """
    attn: Any = layer.self_attn
    mlp: Any = layer.mlp
    hd = attn.head_dim
    cfg = attn.config
    for name, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads),
                        ("v_proj", cfg.num_key_value_heads)):
        old = getattr(attn, name)
        setattr(attn, name, ColumnParallelLinear(old.in_features, heads * hd, old.bias is not None,
                                                 block(heads * hd, tp_size, tp_rank)))
    old = attn.o_proj
    attn.o_proj = RowParallelLinear(old.in_features, old.out_features, old.bias is not None,
                                    block(old.in_features, tp_size, tp_rank), comm)
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        setattr(mlp, name, ColumnParallelLinear(old.in_features, old.out_features, old.bias is not None,
                                                block(old.out_features, tp_size, tp_rank)))
    old = mlp.down_proj
    mlp.down_proj = RowParallelLinear(old.in_features, old.out_features, old.bias is not None,
                                      block(old.in_features, tp_size, tp_rank), comm)


def check_tp_divisible(text_config: Any, tp_size: int) -> None:
    """Raise a clear ``ValueError`` when the text model cannot be split ``tp_size`` ways."""
    sizes = {
        "num_attention_heads": text_config.num_attention_heads,
        "num_key_value_heads": text_config.num_key_value_heads,
        "intermediate_size": text_config.intermediate_size,
    }
    for name, value in sizes.items():
        if value % tp_size:
            common = math.gcd(*sizes.values())
            valid = [d for d in range(1, common + 1) if common % d == 0]
            raise ValueError(
                f"{name} {value} is not divisible by tensor-parallel size {tp_size} "
                f"(tensor-parallel size = rank_size / stage_size). Qwen tensor parallelism splits "
                f"attention heads, KV heads and the MLP intermediate dimension evenly "
                f"({', '.join(f'{k}={v}' for k, v in sizes.items())}); valid tensor-parallel sizes "
                f"for this model: {valid}. Change rank_size/stage_size in declare_servable."
            )


def special_ids(path: Path, text_config: Any, eos_override: Any) -> tuple[set[int], int]:
    """(EOS ids, padding id): the shard option ``eos_token_id`` (int or list) first, then the checkpoint's
    ``generation_config.json``, then the model config; padding falls back to the smallest EOS id."""
    gen = generation_config(path)
    eos = eos_override if eos_override is not None else gen.get("eos_token_id", text_config.eos_token_id)
    eos_ids = set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    pad = gen.get("pad_token_id", getattr(text_config, "pad_token_id", None))
    return eos_ids, int(pad) if pad is not None else min(eos_ids, default=0)
