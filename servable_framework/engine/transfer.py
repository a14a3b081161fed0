"""Stage-to-stage transfer: one typed message definition for every pipeline hop.

A `StageMessage` has a ``kind``, JSON-like ``meta`` (batch statuses, sampling parameters, error texts) and named
tensors. On the wire the metadata goes first over the CPU (gloo) group: its length as one int64, then the
msgpack bytes, which also describe each tensor (name, dtype, shape); then the tensors follow over the device
group (nccl on CUDA, gloo on CPU), in that order. Nothing is pickled, and the only host values read per step
are these metadata bytes, which never live on the GPU.

`broadcast_plan` shares the output rank's per-step decision (tokens, finished flags, how many batches join)
with every rank over the CPU group (through shared memory when every rank is on this host,
``ShardContext.host_comm``); it is the one host transfer of a decode step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch
import torch.distributed as dist

from servable_framework.agent.shard import ShardContext


class StageKind(str, enum.Enum):
    PREFILL = "prefill"  # rows joining (statuses of the batches offered, tensors when any was accepted)
    DECODE = "decode"  # one step of the running rows
    DATA = "data"  # a single-pass model's activations (MatMul)
    REJECT = "reject"  # stage 0 refused the batch; ``meta["error"]`` says why


@dataclass
class StageMessage:
    kind: StageKind
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8)}


class StageTransfer:
    """Sends to the same TP rank of the next stage, receives from that of the previous one."""

    def __init__(self, ctx: ShardContext) -> None:
        self.ctx = ctx
        self.cpu_group = ctx.cpu_group  # None: the default group is already a CPU (gloo) group

    def send(self, message: StageMessage) -> None:
        dst = self.ctx.peer_in_stage(self.ctx.stage + 1)
        described = [{"name": k, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                     for k, t in message.tensors.items()]
        data = msgpack.packb({"kind": message.kind.value, "meta": message.meta, "tensors": described},
                             use_bin_type=True)
        dist.send(torch.tensor([len(data)], dtype=torch.int64), dst=dst, group=self.cpu_group)
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=dst, group=self.cpu_group)
        for t in message.tensors.values():
            dist.send(t.contiguous(), dst=dst)

    def recv(self, expect: tuple[StageKind, ...] | None = None) -> StageMessage:
        src = self.ctx.peer_in_stage(self.ctx.stage - 1)
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=src, group=self.cpu_group)
        data = torch.empty(int(size[0]), dtype=torch.uint8)
        dist.recv(data, src=src, group=self.cpu_group)
        raw = msgpack.unpackb(data.numpy().tobytes(), raw=False)
        kind = StageKind(raw["kind"])
        if expect is not None and kind not in expect:
            raise RuntimeError(f"pipeline out of step: expected {[k.value for k in expect]}, got {kind.value}")
        tensors = {}
        for desc in raw["tensors"]:
            t = torch.empty(desc["shape"], dtype=_DTYPES[desc["dtype"]], device=self.ctx.device)
            dist.recv(t, src=src)
            tensors[desc["name"]] = t
        return StageMessage(kind, raw["meta"], tensors)

    def broadcast_plan(self, plan: np.ndarray | None, length: int) -> np.ndarray:
        """The output rank's int64 plan of ``length`` values, on every rank (CPU group)."""
        buf = torch.from_numpy(plan.astype(np.int64)) if plan is not None else torch.empty(length, dtype=torch.int64)
        if self.ctx.rank_size == 1:
            return buf.numpy()
        if self.ctx.host_comm is not None:  # every rank on this host: through shared memory
            self.ctx.host_comm.broadcast_(buf, self.ctx.output_rank)
        else:
            dist.broadcast(buf, src=self.ctx.output_rank, group=self.cpu_group)
        return buf.numpy()
