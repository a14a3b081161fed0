"""Plain specs recorded by the declaration API and read by the Worker runtime.

A `ServableSpec` is what importing one ``servable_config.py`` produces: its models and its methods.
Methods are traced graphs: every value is a `TensorDef` ``(stage, index)`` where stage 0 is the
method's inputs and stage k (k >= 1) is the k-th ``add_stage`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MODEL_FORMATS = ("TorchExport", "SafeTensors")  # .pt2 programs; Python module + safetensors weights


@dataclass(frozen=True)
class TensorDef:
    """A placeholder for data: output ``index`` of stage ``stage`` (0 = method inputs)."""

    stage: int
    index: int
    tag: str = ""

    def __repr__(self) -> str:
        return f"TensorDef(stage={self.stage}, index={self.index})"


@dataclass
class DistributedSpec:
    """`distributed.declare_servable` arguments that only agents need."""

    rank_size: int
    stage_size: int
    enable_pipeline_infer: bool
    shard: str
    shard_options: dict[str, Any]
    continuous_batching: bool = False  # batches dispatched while one runs may join it (see agent/shard.py)

    @property
    def tp_size(self) -> int:
        return self.rank_size // self.stage_size

    @property
    def output_rank(self) -> int:
        """The rank that answers: the first TP rank of the last stage."""
        return self.rank_size - self.tp_size


@dataclass
class ModelSpec:
    """One declared model. ``key`` identifies it (MindSpore: ``";".join(files)``; distributed: the servable name).
    ``files[i]`` is sub-graph i: `add_stage` runs sub-graph 0, ``Model.call(..., subgraph=i)`` any of them."""

    key: str
    files: list[str]
    model_format: str
    with_batch_dim: bool
    without_batch_dim_inputs: tuple[int, ...]
    max_batch_size: int  # 0 = derive (static batch dim of the model, or 8 for dynamic shapes)
    max_batch_delay_ms: float
    module_factory: Callable[[], Any] | None = None
    device_dtype: str | None = None
    distributed: DistributedSpec | None = None
    # the counts of sub-graph 0, set by the first add_stage that uses the model; ``registered_by`` names that
    # stage ("stage 2 of method 'predict'") for the errors that compare counts
    inputs_count: int | None = None
    outputs_count: int | None = None
    registered_by: str = ""

    @property
    def subgraph_count(self) -> int:
        """MindSpore: a list of files is one model with several sub-graphs (sub-graph i = file i)."""
        return max(len(self.files), 1)  # a distributed model has no files and one graph


@dataclass
class StageSpec:
    """One ``add_stage`` call."""

    inputs: list[TensorDef]
    outputs_count: int
    tag: str
    model: ModelSpec | None = None
    function: Callable[..., Any] | None = None
    batch_size: int | None = None  # functions only: None = per instance; 0 = server decides; n = at most n


@dataclass
class MethodSpec:
    name: str
    input_names: list[str]
    output_names: list[str]
    stages: list[StageSpec] = field(default_factory=list)
    returns: list[TensorDef] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)  # optional inputs -> value used when absent
    stream: bool = False  # `register_method(stream=True)`: a client may ask for its outputs piece by piece

    @property
    def required_inputs(self) -> list[str]:
        return [n for n in self.input_names if n not in self.defaults]


@dataclass
class ServableSpec:
    name: str
    directory: str  # the servable_directory (parent of the servable's folder)
    models: list[ModelSpec] = field(default_factory=list)
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    # "{servable}.{func}" -> (inputs_count, outputs_count, batched) for cross-method consistency checks
    functions: dict[str, tuple[int, int, bool]] = field(default_factory=dict)
    request_timeout_s: float | None = None  # `register.set_servable_options`; None = Main's default

    @property
    def distributed_model(self) -> ModelSpec | None:
        return next((m for m in self.models if m.distributed is not None), None)
