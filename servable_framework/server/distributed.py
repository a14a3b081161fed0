"""``servable_framework.server.distributed``: servables whose model is split across Agents (contract §6).

In ``servable_config.py``::

    model = distributed.declare_servable(rank_size=8, stage_size=1, with_batch_dim=False, shard="matmul")

In ``serving_server.py``: ``distributed.start_servable(servable_dir, "matmul", rank_table_json_file=...,
distributed_address="127.0.0.1:6200")``; in ``serving_agent.py``: ``distributed.startup_agents(
"127.0.0.1:6200", model_files=[...])``.
"""

from __future__ import annotations

from typing import Any

from servable_framework.agent.launcher import startup_agents
from servable_framework.servable.declare import Model, declare_distributed
from servable_framework.server.start_config import DistributedStartConfig


def declare_servable(rank_size: int, stage_size: int, with_batch_dim: bool = True,
                     without_batch_dim_inputs: int | list[int] | None = None, enable_pipeline_infer: bool = False,
                     *, shard: str, shard_options: dict[str, Any] | None = None, max_batch_size: int = 0,
                     max_batch_delay_ms: float = 0.0, continuous_batching: bool = False) -> Model:
    """Declare this servable's model as distributed over ``rank_size`` Agents in ``stage_size`` pipeline stages.

    Args:
        rank_size: number of Agents (ranks), >= 1.
        stage_size: pipeline stages, >= 1; ``rank_size / stage_size`` ranks per stage form a tensor-parallel group.
        with_batch_dim: instances of concurrent requests are batched (up to ``max_batch_size``, default 8).
        without_batch_dim_inputs: accepted for compatibility (shards see per-instance inputs).
        enable_pipeline_infer: up to ``stage_size`` batches in flight at once.
        shard: the shard implementation the Agents load: a name registered in ``agents/<name>.py``
            (``@register_shard(name)``) or ``"package.module:Class"``.
        shard_options: JSON-serialisable options handed to the shard (``ShardContext.options``).
        max_batch_size: most instances per model call when ``with_batch_dim``.
        max_batch_delay_ms: how long a batch may wait for more instances (0 = take what is queued).
        continuous_batching: keep up to ``max_batch_size`` batches in flight; a shard with a multi-step
            loop (the Qwen decode loop) takes newly arrived instances into the running batch at a step
            boundary, as rows free up, instead of making them wait for the whole batch to finish. Waiting
            batches join at once when nothing else runs or they fill the free rows, else once the oldest has
            waited ``max_batch_delay_ms`` (each join costs a prefill pass, so a few are gathered into one).
    """
    return declare_distributed(rank_size, stage_size, with_batch_dim, without_batch_dim_inputs, enable_pipeline_infer,
                               shard, shard_options, max_batch_size, max_batch_delay_ms, continuous_batching)


def start_servable(servable_directory: str, servable_name: str, rank_table_json_file: str, version_number: int = 1,
                   distributed_address: str = "0.0.0.0:6200", wait_agents_time_in_seconds: int = 0, *,
                   keys_dir: str | None = None) -> None:
    """Start the Distributed Worker of a servable and block until all its Agents registered.

    Args:
        servable_directory: folder holding ``{servable_name}/servable_config.py`` (relative: to the script).
        servable_name: the servable's folder name.
        rank_table_json_file: rank table (``server_list`` or ``group_list`` layout; relative: to the script).
        version_number: version reported for the servable (0 -> 1); model files live on the Agents.
        distributed_address: ``"ip:port"`` the Agents connect to.
        wait_agents_time_in_seconds: give up when not all Agents registered within this time (0 = wait forever).
        keys_dir: CurveZMQ keys (`servable_framework.curve`; default ``$SERVABLE_KEYS_DIR``): only Agents holding
            an authorized key can register. Required when ``distributed_address`` is not loopback (the default
            ``0.0.0.0`` is not): a start error otherwise, naming the command that creates keys.

    Raises:
        RuntimeError: ``Fail to start workers: Failed to wait for ready of all agents, current agents count: k,
            rank size: n`` on timeout; the rank table and declaration errors of contract §6.2.
    """
    from servable_framework import server

    server.start_servables(DistributedStartConfig(servable_directory, servable_name, rank_table_json_file,
                                                  version_number, distributed_address, wait_agents_time_in_seconds,
                                                  keys_dir))


__all__ = ["DistributedStartConfig", "declare_servable", "start_servable", "startup_agents"]
