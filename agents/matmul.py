"""Column-parallel MatMul shard (MindSpore's distributed MatMul example): ``y = -(x @ W)``.

Each rank's model file is a safetensors file holding its column slice ``w`` of ``W`` ([K, N / tp]).
Stage 0 computes ``x @ w`` and all-gathers the slices across its TP group. With ``stage_size > 1`` every
stage is one such column-parallel layer: stage s sends its activations to the same TP rank of stage s+1
(a shape header first, then the tensor); the last stage negates the result and its first TP rank answers.
A batch stage 0 rejects (bad shapes) is announced downstream instead (header ``[-1, len(text), 0]``, then the
error text), so every stage fails it with the same message and stays in step for the next batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from servable_framework.agent.shard import InstanceValues, ModelShard, ShardContext, register_shard


@register_shard("matmul")
class MatMulShard(ModelShard):
    def __init__(self, ctx: ShardContext) -> None:
        super().__init__(ctx)
        with safe_open(ctx.model_files[0], framework="pt", device="cpu") as f:
            self.weight = f.get_tensor("w").to(ctx.device)  # this rank's file holds only its own slice
        self.in_features = self.weight.shape[0]

    def _layer(self, x: torch.Tensor) -> torch.Tensor:
        local = x @ self.weight
        if self.ctx.tp_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.ctx.tp_size)]
        dist.all_gather(parts, local.contiguous(), group=self.ctx.tp_group)
        return torch.cat(parts, dim=-1)

    def _recv(self) -> torch.Tensor:
        src = self.ctx.peer_in_stage(self.ctx.stage - 1)
        header = torch.empty(3, dtype=torch.int64, device=self.ctx.device)
        dist.recv(header, src=src)
        if int(header[0]) < 0:  # stage 0 rejected the batch: pass the news on, fail alike
            text = torch.empty(int(header[1]), dtype=torch.uint8, device=self.ctx.device)
            dist.recv(text, src=src)
            message = bytes(text.cpu().tolist()).decode(errors="replace")
            self._reject_downstream(message)
            raise ValueError(message)
        x = torch.empty(tuple(header.tolist()), dtype=torch.float32, device=self.ctx.device)
        dist.recv(x, src=src)
        return x

    def _reject_downstream(self, message: str) -> None:
        if self.ctx.is_last_stage:
            return
        dst = self.ctx.peer_in_stage(self.ctx.stage + 1)
        data = message.encode()
        dist.send(torch.tensor([-1, len(data), 0], dtype=torch.int64, device=self.ctx.device), dst=dst)
        dist.send(torch.tensor(list(data), dtype=torch.uint8, device=self.ctx.device), dst=dst)

    def _send(self, y: torch.Tensor) -> None:
        dst = self.ctx.peer_in_stage(self.ctx.stage + 1)
        dist.send(torch.tensor(y.shape, dtype=torch.int64, device=self.ctx.device), dst=dst)
        dist.send(y.contiguous(), dst=dst)

    @torch.inference_mode()
    def predict(self, instances: list[InstanceValues] | None) -> list[InstanceValues] | None:
        if self.ctx.is_first_stage:
            try:
                x = self._inputs(instances)
            except ValueError as exc:  # before any collective
                self._reject_downstream(str(exc))
                raise
        else:
            x = self._recv()
        y = self._layer(x)
        if not self.ctx.is_last_stage:
            self._send(y)
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
