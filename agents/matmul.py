"""Column-parallel MatMul shard (MindSpore's distributed MatMul example): ``y = -(x @ W)``.

Each rank's model file is a safetensors file holding its column slice ``w`` of ``W`` ([K, N / tp]).
Stage 0 computes ``x @ w`` and all-gathers the slices across its TP group. With ``stage_size > 1`` every
stage is one such column-parallel layer: stage s sends its activations to the same TP rank of stage s+1 as a
`StageMessage` (``DATA`` with tensor ``x``); the last stage negates the result and its first TP rank answers.
A batch stage 0 rejects (bad shapes) travels down as a ``REJECT`` message with the error text, so every stage
fails it with the same message and stays in step for the next batch.
"""

from __future__ import annotations

import numpy as np
import torch

from servable_framework.agent.shard import InstanceValues, ModelShard, ShardContext, register_shard
from servable_framework.crypto import safe_open  # safetensors' own; decrypts in memory with a dec_key
from servable_framework.engine.transfer import StageKind, StageMessage, StageTransfer


@register_shard("matmul")
class MatMulShard(ModelShard):
    def __init__(self, ctx: ShardContext) -> None:
        super().__init__(ctx)
        with safe_open(ctx.model_files[0], framework="pt", device="cpu") as f:
            self.weight = f.get_tensor("w").to(ctx.device)  # this rank's file holds only its own slice
        self.in_features = self.weight.shape[0]
        self.transfer = StageTransfer(ctx)
        self.comm = ctx.tp_comm

    def _layer(self, x: torch.Tensor) -> torch.Tensor:
        local = x @ self.weight
        if self.ctx.tp_size == 1:
            return local
        return torch.cat(self.comm.all_gather(local), dim=-1)

    @torch.inference_mode()
    def predict(self, instances: list[InstanceValues] | None) -> list[InstanceValues] | None:
        last = self.ctx.is_last_stage
        if self.ctx.is_first_stage:
            try:
                x = self._inputs(instances)
            except ValueError as exc:  # before any collective: tell the later stages, then fail alike
                if not last:
                    self.transfer.send(StageMessage(StageKind.REJECT, {"error": str(exc)}))
                raise
        else:
            message = self.transfer.recv((StageKind.DATA, StageKind.REJECT))
            if message.kind is StageKind.REJECT:
                if not last:
                    self.transfer.send(message)
                raise ValueError(message.meta["error"])
            x = message.tensors["x"]
        y = self._layer(x)
        if not last:
            self.transfer.send(StageMessage(StageKind.DATA, {}, {"x": y}))
            return None
        if not self.ctx.is_output_rank:
            return None
        out = (-y).cpu().numpy()
        return [[out[i]] for i in range(out.shape[0])]

    def _inputs(self, instances: list[InstanceValues] | None) -> torch.Tensor:
        if not instances:
            raise ValueError("stage-0 ranks must receive the instances")
        xs = [np.asarray(inst[0], dtype=np.float32) for inst in instances]
        for x in xs:
            if x.ndim != 2 or x.shape[1] != self.in_features:
                raise ValueError(f"input x must be [rows, {self.in_features}] float32, got shape {list(x.shape)}")
        if len({x.shape for x in xs}) != 1:
            raise ValueError("all instances of a batch must have the same shape")
        return torch.from_numpy(np.stack(xs)).to(self.ctx.device)  # [batch, rows, K]
