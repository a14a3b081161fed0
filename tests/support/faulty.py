"""A shard that fails on one rank in the middle of a batch, after its peers entered a collective
(``declare_servable(shard="tests.support.faulty:FaultyMatMulShard")``): the MatMul shard, except that rank 1
raises before its all-gather whenever the first input value of the batch is `TRIGGER`, and hangs there (alive,
answering heartbeats) when it is `HANG`. Rank 0 is then left waiting inside the all-gather: the group is out of
step and must re-form."""

from __future__ import annotations

import threading

import torch

from agents.matmul import MatMulShard

TRIGGER = 13.0
HANG = 17.0


class FaultyMatMulShard(MatMulShard):
    def _layer(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.rank == 1 and float(x.reshape(-1)[0]) == TRIGGER:
            raise RuntimeError("injected fault before the all-gather")
        if self.ctx.rank == 1 and float(x.reshape(-1)[0]) == HANG:
            threading.Event().wait()  # a compute thread that never comes back
        return super()._layer(x)
