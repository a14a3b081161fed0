"""The contract between an Agent process and a model-shard implementation (top-level ``agents/``).

An Agent owns one rank. It builds a `ShardContext` (its place in the rank grid, its process
groups, its device, the model files given to `startup_agents` for this rank), then constructs
the shard class registered under the servable's ``shard`` name. For every batch the Distributed
Worker dispatches, *every* rank calls `ModelShard.predict` in the same order:

* ranks of stage 0 receive the instances (a list; one list of input values per instance);
* ranks of later stages receive ``None`` and get what they need from upstream over torch.distributed;
* the output rank (first TP rank of the last stage) returns one list of output values per
  instance; every other rank returns ``None``.

Continuous batching (optional, `declare_servable(continuous_batching=True)`): while ``predict`` runs a
multi-step batch (a decode loop), batches the Worker dispatched meanwhile wait on every rank. At a step
boundary the output rank asks ``self.link.joinable(active_rows)`` how many of them fit, shares that
number with every rank through its own collective, and every rank calls ``self.link.join(k)`` to take the
same batches, then ``complete``/``fail`` each when its rows are done. A shard that never calls these
runs the waiting batches one after another, as before.

Streaming (optional, methods declared with ``register_method(..., stream=True)``): once per step the output
rank may call ``self.link.stream(pieces)`` with the new outputs of its running instances; the Worker runs the
method's postprocess on each instance's outputs so far and sends the difference to the client.

A shard must load only its own slice of the weights, must use ``ctx.tp_comm`` for TP collectives (never the
default group), and must not change the order of collectives between ranks. A ``ValueError``/``ServingError``
raised for bad inputs is reported to the client; any other exception fails the batch and is logged with its
traceback.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from servable_framework.engine.collectives import DistComm, TPComm
from servable_framework.wire import Value

InstanceValues = list[Value]


@dataclass(frozen=True)
class ShardContext:
    """Where one Agent sits. ``rank`` is global; ``tp_rank`` is its index inside its stage."""

    rank: int
    rank_size: int
    stage_size: int
    model_files: list[str]
    device: torch.device
    tp_group: dist.ProcessGroup | None = None  # the ranks of this stage (None when tp_size == 1)
    # a gloo group of every rank for host-side metadata when the default group is nccl (None: the default
    # group is gloo already)
    cpu_group: dist.ProcessGroup | None = None
    options: dict[str, Any] = field(default_factory=dict)  # `declare_servable(shard_options=...)`
    # the TP group's collectives when the Agent chose them (shared memory for ranks on one host); see `tp_comm`
    comm: TPComm | None = None
    # collectives of every rank for host-side (CPU) tensors when all ranks run on this host (shared memory);
    # None: ``cpu_group`` (or the default group) over torch.distributed
    host_comm: TPComm | None = None

    @property
    def tp_comm(self) -> TPComm:
        """The collectives of this rank's TP group (`servable_framework.engine.collectives`): sum, all-gather,
        gather. Model code uses these, never ``torch.distributed`` on ``tp_group`` directly."""
        return self.comm if self.comm is not None else DistComm(self.tp_group)

    @property
    def tp_size(self) -> int:
        return self.rank_size // self.stage_size

    @property
    def stage(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def stage_ranks(self) -> list[int]:
        return list(range(self.stage * self.tp_size, (self.stage + 1) * self.tp_size))

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.stage_size - 1

    @property
    def is_output_rank(self) -> bool:
        return self.is_last_stage and self.tp_rank == 0

    @property
    def output_rank(self) -> int:
        """Global rank of the first TP rank of the last stage (it samples and answers)."""
        return (self.stage_size - 1) * self.tp_size

    def peer_in_stage(self, stage: int) -> int:
        """The global rank with the same tp_rank in ``stage`` (pipeline send/recv partner)."""
        return stage * self.tp_size + self.tp_rank


class InStepError(RuntimeError):
    """A batch failed, but every rank failed it alike and the group is still in step (for example stage 0
    could not prepare it and said so downstream). Any other non-client exception from ``predict`` means the
    ranks may be out of step, and the Agent makes the group re-form."""


@dataclass
class WaitingBatch:
    """A batch the Worker dispatched while another was running on this rank."""

    batch_id: int
    instances: list[InstanceValues] | None  # stage-0 ranks: the inputs; later stages: None
    count: int  # number of instances (known on every rank)
    arrived: float = field(default_factory=time.monotonic)  # when it reached this rank


class BatchLink(Protocol):
    """What the Agent offers the running ``predict`` (``ModelShard.link``). Every method is called on the
    compute thread; ``batch_id`` is the id of the batch ``predict`` was called for."""

    batch_id: int

    def emit(self, batch_id: int, index: int, outputs: InstanceValues) -> None:
        """Output rank: instance ``index`` of batch ``batch_id`` is complete; answer it now."""

    def complete(self, batch_id: int, outputs: list[InstanceValues] | None) -> None:
        """Every rank: batch ``batch_id`` is done (outputs on the output rank, None elsewhere); its reply
        leaves now. For the batch ``predict`` was called for, the value ``predict`` returns is then ignored."""

    def fail(self, batch_id: int, error: Exception) -> None:
        """Every rank: a joined batch failed alone (``ValueError`` = the client's fault)."""

    def joinable(self, active_rows: int) -> int:
        """Output rank: how many waiting batches, in arrival order, fit beside ``active_rows`` running rows
        (0 when continuous batching is off). Never blocks."""

    def join(self, k: int) -> list[WaitingBatch]:
        """Every rank, with the same ``k``: take the next ``k`` waiting batches (waits, bounded, for any that
        has not reached this rank yet)."""

    def cancelled(self) -> set[tuple[int, int]]:
        """Output rank: (batch id, index) of the running instances whose caller gave up (timed out). A shard
        that works step by step finishes them at its next step and reports each with `stopped`; others may
        ignore it. Never blocks."""

    def stopped(self, batch_id: int, index: int) -> None:
        """Output rank: instance ``index`` of ``batch_id`` was finished early because it was cancelled."""

    def progress(self) -> None:
        """Every rank: a step completed (the Agent's watchdog fails a batch that stops making steps)."""

    def stream(self, pieces: list[tuple[int, int, InstanceValues, str | None]]) -> None:
        """Output rank, optional, at most once per step: ``(batch_id, index, outputs, finish)`` for running
        instances, where ``outputs`` holds only the NEW model outputs of this step (for an LLM
        ``[int64 array of the new token ids]``, possibly empty; arrays are concatenated along axis 0 by the
        Worker) and ``finish`` is None, or the reason (``"eos"``, ``"length"``, ``"stop"``, ``"cancelled"``)
        on the instance's last piece. Only instances whose request streams are sent on (one message per batch);
        the others cost nothing. ``emit``/``complete`` must still deliver the full outputs. Never blocks."""


class ModelShard:
    """Base class of shard implementations. Subclasses load their slice in ``__init__``."""

    def __init__(self, ctx: ShardContext) -> None:
        self.ctx = ctx
        self.link: BatchLink | None = None  # set by the Agent while ``predict`` runs

    def predict(self, instances: list[InstanceValues] | None) -> list[InstanceValues] | None:
        raise NotImplementedError

    def emit(self, index: int, outputs: InstanceValues) -> None:
        """Output rank only, optional: instance ``index`` of the current batch is complete, answer it now
        (its request need not wait for the rest of the batch). ``predict`` must still return every instance."""
        if self.link is not None:
            self.link.emit(self.link.batch_id, index, outputs)

    def close(self) -> None:
        """Release resources; called once before the Agent exits."""


_REGISTRY: dict[str, type[ModelShard]] = {}


def register_shard(name: str) -> Callable[[type[ModelShard]], type[ModelShard]]:
    """Class decorator: make a shard findable by ``name`` (``declare_servable(shard=name)``)."""

    def deco(cls: type[ModelShard]) -> type[ModelShard]:
        _REGISTRY[name] = cls
        return cls

    return deco


def find_shard(name: str) -> type[ModelShard]:
    """Resolve ``name``: a registered name (module ``agents.<name>`` is imported first), or ``pkg.mod:Class``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, ModelShard)):
            raise TypeError(f"'{name}' is not a ModelShard subclass")
        return cls
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"agents.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"agents.{name}":
                raise
    if name not in _REGISTRY:
        raise KeyError(f"no shard implementation named '{name}': expected module agents/{name}.py "
                       f"with @register_shard('{name}'), or 'package.module:Class'")
    return _REGISTRY[name]
