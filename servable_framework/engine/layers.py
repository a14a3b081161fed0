"""Tensor-parallel building blocks a model file composes: Megatron column/row-parallel linears, the
vocabulary-parallel output head, and the split of decoder layers over pipeline stages.

``ColumnParallelLinear`` keeps a contiguous block of output rows; ``RowParallelLinear`` keeps the matching
block of input columns, sums the partial outputs over the stage's TP group (``ShardContext.tp_comm``) and adds its
bias once, after the reduce. ``VocabParallelHead`` keeps a block of the vocabulary on every TP rank of the last
stage; the output rank gathers the blocks into full logits, so no rank computes the whole head while its peers
wait. Every rank reads only its slices (see `checkpoint.load_module_`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from servable_framework.engine.collectives import TPComm


def block(total: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, end) of rank ``tp_rank``'s equal block of ``total`` (``total`` divisible by ``tp_size``)."""
    size = total // tp_size
    return tp_rank * size, (tp_rank + 1) * size


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
    """``y = all_reduce(x_local @ W[:, cols].T) + b``: partial products summed by ``comm`` (None: one rank)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cols: tuple[int, int],
                 comm: TPComm | None) -> None:
        super().__init__()
        self.in_features, self.out_features = cols[1] - cols[0], out_features
        self.cols = cols  # [start, end) in the full weight's input dimension
        self.comm = comm
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.full_in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.comm is not None and self.comm.size > 1:
            self.comm.all_reduce_(y)
        return y if self.bias is None else y + self.bias  # bias once, after the reduce

    def extra_repr(self) -> str:
        return f"cols={self.cols[0]}:{self.cols[1]} of {self.full_in_features}, out={self.out_features}"


class VocabParallelHead(nn.Module):
    """The output projection split over the vocabulary: TP rank ``r`` holds rows ``rows`` (``ceil(V / tp)``
    each, the last block shorter). ``forward`` returns the full ``[B, V]`` logits on TP rank 0 (the output
    rank) and None on the others, which still take part in the gather."""

    def __init__(self, hidden_size: int, vocab_size: int, tp_size: int, tp_rank: int,
                 comm: TPComm | None) -> None:
        super().__init__()
        self.chunk = -(-vocab_size // tp_size)
        start = min(tp_rank * self.chunk, vocab_size)
        self.rows = (start, min(start + self.chunk, vocab_size))
        self.vocab_size, self.tp_size, self.tp_rank, self.comm = vocab_size, tp_size, tp_rank, comm
        self.weight = nn.Parameter(torch.empty(self.rows[1] - self.rows[0], hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        local = F.linear(x, self.weight).float()
        if self.tp_size == 1 or self.comm is None:
            return local
        if local.shape[-1] < self.chunk:  # equal sizes for the gather; the padding is cut off below
            local = F.pad(local, (0, self.chunk - local.shape[-1]))
        parts = self.comm.gather(local, dst=0)
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]

    def extra_repr(self) -> str:
        return f"vocab rows={self.rows[0]}:{self.rows[1]} of {self.vocab_size}"


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
