"""What a model file provides to the generation engine (the engine owns everything else: rows, their
lifecycle, the KV cache, sampling, stage-to-stage transfer, streaming, cancellation).

One `EngineModel` instance lives on every rank and holds only that rank's slice. The engine calls:

* stage 0 (every TP rank of it): `parse` per instance (``ValueError`` = bad input, reported to its client),
  then `embed_prefill` for the accepted prompts (left-padded) and `embed_decode` for one new token per row;
* every stage: `forward` over its own layer range, with the engine's `CacheView` (the attention layers call
  ``cache.update(k, v, layer_idx)`` and use ``cache.mask`` as their attention mask);
* the last stage (every TP rank of it): `compute_logits` on the last position's hidden states; the output rank
  gets ``[B, vocab]`` logits, the others None (the head is vocabulary-parallel, see `VocabParallelHead`).

Positions are the model's business: `embed_prefill` returns the positions of the prompt tokens (any shape, for
example ``[3, B, T]`` for mRoPE) and each row's next decode position; `embed_decode` turns next positions into
the positions of one decode step. The engine carries positions to later stages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from servable_framework.agent.shard import InstanceValues, ShardContext
from servable_framework.engine.kv_cache import CacheView
from servable_framework.engine.sampling import SamplingParams


@dataclass
class Prompt:
    """One validated instance (stage 0)."""

    token_ids: np.ndarray  # int64 [T]
    sampling: SamplingParams
    extras: dict[str, Any] = field(default_factory=dict)  # model-specific inputs (pixel values, ...)


@dataclass
class KVShape:
    """What the engine allocates the KV cache with (this rank's share)."""

    num_layers: int  # layers this rank runs
    kv_heads: int  # KV heads on this rank (after the TP split)
    head_dim: int


class EngineModel(ABC):
    """Base of model files: load the slice in ``__init__`` (from ``ctx.model_files``), provide the calls below."""

    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    vocab_size: int
    eos_token_ids: set[int]
    pad_token_id: int
    kv: KVShape

    def __init__(self, ctx: ShardContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def parse(self, instance: InstanceValues) -> Prompt:
        """Stage 0: validate one instance's inputs (`ValueError` with the reason when they are bad)."""

    @abstractmethod
    def embed_prefill(self, prompts: list[Prompt], input_ids: torch.Tensor, valid: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 0: ``input_ids``/``valid`` [B, T] (left-padded) -> (hidden [B, T, H], positions, next decode
        position of each row [B] int64)."""

    @abstractmethod
    def embed_decode(self, tokens: torch.Tensor, next_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 0: one token per row ([n] int64) -> (hidden [n, 1, H], positions of this step)."""

    @abstractmethod
    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, cache: CacheView) -> torch.Tensor:
        """Every stage: this rank's decoder layers."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Last stage: final norm + vocabulary-parallel head on ``hidden`` [B, H]; full logits on the output
        rank, None on its TP peers."""

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every parameter and buffer this rank holds (reports and tests)."""
        for name, module in vars(self).items():
            if isinstance(module, torch.nn.Module):
                for n, t in [*module.named_parameters(), *module.named_buffers()]:
                    yield f"{name}.{n}", t

    def close(self) -> None:
        """Release the weights (drops every module attribute; a model file may do more)."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.nn.Module):
                setattr(self, name, None)
