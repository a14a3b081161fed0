"""Building blocks of the Qwen2.5-VL shard: Megatron-style parallel linears, a slicing checkpoint
reader, layer splitting for pipeline stages, and the output rank's per-instance sampler.

Tensor parallelism (Megatron): ``ColumnParallelLinear`` keeps a contiguous block of output rows
(q/k/v split by head, gate/up by intermediate index, biases with them); ``RowParallelLinear``
keeps the matching block of input columns, sums the partial outputs with ``all_reduce`` over the
stage's TP group and adds its bias once, after the reduce. Every rank reads only its slices
(safetensors ``get_slice``), never the full tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

# --------------------------------------------------------------------------- parallel linears


class ColumnParallelLinear(nn.Module):
    """``y = x @ W[rows].T + b[rows]``: this rank's block of output features (no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rows: tuple[int, int]) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, rows[1] - rows[0]
        self.rows = rows  # [start, end) in the full weight's output dimension
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        self.full_out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, rows={self.rows[0]}:{self.rows[1]} of {self.full_out_features}"


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_local @ W[:, cols].T) + b``: partial products summed over ``group``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cols: tuple[int, int],
                 group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.in_features, self.out_features = cols[1] - cols[0], out_features
        self.cols = cols  # [start, end) in the full weight's input dimension
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.full_in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y if self.bias is None else y + self.bias  # bias once, after the reduce

    def extra_repr(self) -> str:
        return f"cols={self.cols[0]}:{self.cols[1]} of {self.full_in_features}, out={self.out_features}"


def _block(total: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    size = total // tp_size
    return tp_rank * size, (tp_rank + 1) * size


def parallelize_decoder_layer_(layer: nn.Module, tp_size: int, tp_rank: int,
                               group: dist.ProcessGroup | None) -> None:
    """Swap one Qwen2.5-VL decoder layer's attention/MLP linears for this rank's parallel shards.

    Works on a meta-device skeleton (the new parameters are empty until the loader fills them).
    The attention reshapes with ``view(..., -1, head_dim)``, so the local head counts follow from
    the shard sizes; ``num_key_value_groups`` is unchanged because both head counts divide by tp.
    """
    attn, mlp = layer.self_attn, layer.mlp
    hd = attn.head_dim
    for name, heads in (("q_proj", attn.num_heads), ("k_proj", attn.num_key_value_heads),
                        ("v_proj", attn.num_key_value_heads)):
        old = getattr(attn, name)
        new = ColumnParallelLinear(old.in_features, heads * hd, old.bias is not None,
                                   _block(heads * hd, tp_size, tp_rank))
        setattr(attn, name, new)
    old = attn.o_proj
    attn.o_proj = RowParallelLinear(old.in_features, old.out_features, old.bias is not None,
                                    _block(old.in_features, tp_size, tp_rank), group)
    attn.num_heads //= tp_size
    attn.num_key_value_heads //= tp_size
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        setattr(mlp, name, ColumnParallelLinear(old.in_features, old.out_features, old.bias is not None,
                                                _block(old.out_features, tp_size, tp_rank)))
    old = mlp.down_proj
    mlp.down_proj = RowParallelLinear(old.in_features, old.out_features, old.bias is not None,
                                      _block(old.in_features, tp_size, tp_rank), group)
    mlp.intermediate_size //= tp_size


def check_tp_divisible(text_config, tp_size: int) -> None:
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
                f"(tensor-parallel size = rank_size / stage_size). Qwen2.5-VL tensor parallelism splits "
                f"attention heads, KV heads and the MLP intermediate dimension evenly "
                f"({', '.join(f'{k}={v}' for k, v in sizes.items())}); valid tensor-parallel sizes "
                f"for this model: {valid}. Change rank_size/stage_size in declare_servable."
            )


def split_layers(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges per stage; earlier stages take the remainder."""
    if num_stages > num_layers:
        raise ValueError(f"stage_size {num_stages} is larger than the number of decoder layers {num_layers}")
    base, extra = divmod(num_layers, num_stages)
    bounds, start = [], 0
    for s in range(num_stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


# --------------------------------------------------------------------------- checkpoint reading


class CheckpointReader:
    """Reads (slices of) tensors from a Hugging Face safetensors checkpoint directory.

    Supports a single ``model.safetensors`` and sharded checkpoints with
    ``model.safetensors.index.json``. Two key layouts exist for Qwen2.5-VL:

    * the original one (Qwen2.5-VL-7B-Instruct on the hub; also what transformers 5.x
      ``save_pretrained`` writes): ``model.layers.*``, ``model.embed_tokens.*``, ``model.norm.*``,
      ``visual.*``, ``lm_head.*``;
    * the transformers-5 module layout: ``model.language_model.*``, ``model.visual.*``, ``lm_head.*``.

    ``text_key`` / ``vision_key`` map a name relative to the text model / vision tower to the key
    actually stored.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {k: self.path / v for k, v in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self._file_of = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {self.path}")
        self._handles: dict[Path, object] = {}
        keys = self._file_of.keys()
        self.text_prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in keys) \
            else "model."
        self.vision_prefix = "model.visual." if any(k.startswith("model.visual.") for k in keys) else "visual."

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def text_key(self, name: str) -> str:
        return self.text_prefix + name

    def vision_key(self, name: str) -> str:
        return self.vision_prefix + name

    def _slice(self, key: str):
        if key not in self._file_of:
            raise KeyError(f"tensor '{key}' not found in checkpoint {self.path}")
        file = self._file_of[key]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_slice(key)

    def read(self, key: str, dim: int | None = None, block: tuple[int, int] | None = None) -> torch.Tensor:
        """The whole tensor, or only ``[block[0]:block[1]]`` along ``dim`` (0 or 1)."""
        sl = self._slice(key)
        if dim is None:
            return sl[:]
        a, b = block
        return sl[a:b] if dim == 0 else sl[:, a:b]

    def close(self) -> None:
        self._handles.clear()


def load_module_(module: nn.Module, reader: CheckpointReader, key_of, device: torch.device,
                 dtype: torch.dtype) -> None:
    """Fill every parameter of ``module`` (a meta skeleton) from the checkpoint, slicing parallel layers.

    ``key_of(name)`` maps a parameter name relative to ``module`` to its checkpoint key.
    """
    state = {}
    for mod_name, mod in module.named_modules():
        for p_name, param in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            key = key_of(name)
            if isinstance(mod, ColumnParallelLinear):
                t = reader.read(key, 0, mod.rows)
            elif isinstance(mod, RowParallelLinear) and p_name == "weight":
                t = reader.read(key, 1, mod.cols)
            else:
                t = reader.read(key)
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"checkpoint tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
            state[name] = t.to(device=device, dtype=dtype)
    module.load_state_dict(state, strict=True, assign=True)
    for p in module.parameters():
        p.requires_grad_(False)


# --------------------------------------------------------------------------- sampling


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                      generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits ``[V]`` (float32, CPU).

    ``temperature == 0`` is greedy (argmax, first index on ties). Otherwise, in Hugging Face's order:
    divide by the temperature, keep the ``top_k`` largest (0 = off), keep the smallest set whose
    probability reaches ``top_p`` (1 = off; the most likely token is always kept), then draw from
    the softmax with ``generator`` (None = torch's global RNG).
    """
    if temperature == 0:
        return int(torch.argmax(logits))
    scores = logits / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class GenerationResult:
    """What the output rank gets back from ``Qwen25VLShard.generate``."""

    tokens: list[list[int]]  # per instance, EOS excluded
    finish_reasons: list[str]  # "eos" or "length"
    logits: list[np.ndarray] = field(default_factory=list)  # per instance [steps, vocab] float32 (collect_logits)


class BatchSampler:
    """Output-rank state of the rows being generated: per-row options, RNGs, tokens, logits and stop reasons.

    Rows are numbered in the order they were added (`add`); a batch that joins a running one adds its rows
    later. A row stops at its first EOS token (not added to its tokens) or after ``max_new_tokens``.
    Finished rows leave: ``active`` lists the ids of the rows still being decoded, in row order, and every
    rank drops the same rows after each step (see `step`).
    """

    def __init__(self, eos_ids: set[int], pad_id: int, collect_logits: bool) -> None:
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.collect_logits = collect_logits
        self.options: list[list[float]] = []
        self.generators: list[torch.Generator | None] = []
        self.tokens: list[list[int]] = []
        self.logits: list[list[np.ndarray]] = []
        self.reasons: list[str] = []
        self.active: list[int] = []
        self.finished_now: list[int] = []  # row ids that finished at the last step

    def add(self, sampling: torch.Tensor) -> list[int]:
        """Append rows (``sampling``: [B, 5] of [max_new_tokens, temperature, top_p, top_k, seed]); their ids."""
        ids = []
        for opts in sampling.cpu().tolist():
            seed = int(opts[4])
            ids.append(len(self.options))
            self.options.append(opts)
            self.generators.append(torch.Generator().manual_seed(seed) if seed >= 0 else None)
            self.tokens.append([])
            self.logits.append([])
            self.reasons.append("")
        self.active.extend(ids)
        return ids

    def step(self, logits: torch.Tensor, stop: Collection[int] = ()) -> torch.Tensor:
        """Choose one token per active row (``logits`` [len(active), vocab]); return ``tokens (n) + finished (n)
        + [all_done]`` (int64, CPU), n = rows before this step. Rows in ``stop`` (cancelled: nobody waits for
        them) finish now without a token, with reason "cancelled", and are not in ``finished_now``."""
        logits = logits.cpu()
        n = len(self.active)
        out = [self.pad_id] * n + [0] * n + [0]
        self.finished_now = []
        for row, b in enumerate(self.active):
            if b in stop:
                self.reasons[b] = "cancelled"
                out[n + row] = 1
                continue
            max_new, temperature, top_p, top_k, _seed = self.options[b]
            if self.collect_logits:
                self.logits[b].append(logits[row].numpy().copy())
            token = sample_next_token(logits[row], temperature, top_p, int(top_k), self.generators[b])
            out[row] = token
            if token in self.eos_ids:
                self.reasons[b] = "eos"
            else:
                self.tokens[b].append(token)
                if len(self.tokens[b]) >= int(max_new):
                    self.reasons[b] = "length"
            if self.reasons[b]:
                out[n + row] = 1
                self.finished_now.append(b)
        self.active = [b for b in self.active if not self.reasons[b]]
        out[-1] = int(not self.active)
        return torch.tensor(out, dtype=torch.int64)

    def result(self, rows: list[int]) -> GenerationResult:
        """The result of the given rows (one batch), in that order."""
        logits = [np.stack(self.logits[b]) if self.logits[b] else np.empty((0, 0), np.float32) for b in rows] \
            if self.collect_logits else []
        return GenerationResult([self.tokens[b] for b in rows], [self.reasons[b] for b in rows], logits)


def torch_dtype(value, default: torch.dtype) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return dtype
