"""What crosses processes on the Agent side, typed and validated on both ends (pydantic, ``extra="forbid"``).

* `AgentConfig`: the Distributed Worker's answer to a startup process's CONFIG request (msgpack over its
  link), carried on in each Agent's payload. Built by `AgentPool`, validated by `WorkerLink.fetch_config`.
* `AgentPayload`: what the startup process gives one Agent process (JSON through its payload pipe,
  `procs.spawn`). Built by `AgentSupervisor`, validated by `agent_main`.

A field added on one end and not the other fails validation at once, with the field's name, instead of a
``.get`` default silently standing in for a setting that was never sent.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AgentHeartbeat(_Strict):
    interval_s: float = Field(gt=0, description="the Distributed Worker pings every Agent this often")
    timeout_s: float = Field(gt=0, description="an Agent that heard no ping for this long leaves (re-joins)")
    step_timeout_s: float = Field(gt=0, description="a batch that makes no step for this long fails and the "
                                  "group re-forms (a peer hung or died inside a collective)")


class AgentConfig(_Strict):
    servable: str
    rank_size: int = Field(ge=1)
    stage_size: int = Field(ge=1)
    shard: str = Field(description="the shard class name (`agent.shard.find_shard`)")
    shard_options: dict[str, Any]
    with_batch_dim: bool
    ranks: list[tuple[str, int]] = Field(description="rank -> (rank table host address, device id)")
    store_port: int = Field(ge=1, le=65535, description="the rendezvous TCPStore on the Distributed Worker's host")
    generation: int = Field(ge=0, description="which incarnation of the group to join")
    heartbeat: AgentHeartbeat
    group_timeout_s: float = Field(gt=0, description="torch.distributed timeout of the rendezvous and of every "
                                   "collective (`Settings.group_timeout_s`)")
    continuous_batching: bool
    max_batch_rows: int = Field(ge=0)
    max_batch_delay_ms: float = Field(ge=0)


class AgentPayload(_Strict):
    rank: int = Field(ge=0)
    device_id: int = Field(ge=0)
    model_files: list[str]
    config: AgentConfig
    distributed_address: str
    status_fd: int = Field(ge=0, description="write end of the status pipe to the startup process")
    threads: int = Field(ge=1, description="torch intra-op threads")
    keys_dir: str | None = Field(description="CurveZMQ keys directory (`servable_framework.curve`), or None")
