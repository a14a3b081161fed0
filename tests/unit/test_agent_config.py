"""The typed Agent configs: what the Distributed Worker sends and the startup process hands to each Agent is
validated on both ends, so a missing, unknown or ill-typed field fails at once with its name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from servable_framework.agent.config import AgentConfig, AgentPayload
from servable_framework.agent.worker_link import WorkerLink

GOOD = {"servable": "matmul", "rank_size": 2, "stage_size": 1, "shard": "matmul", "shard_options": {},
        "with_batch_dim": False, "ranks": [["127.0.0.1", 0], ["127.0.0.1", 1]], "store_port": 29500,
        "generation": 3, "heartbeat": {"interval_s": 1.0, "timeout_s": 3.0, "step_timeout_s": 30.0},
        "group_timeout_s": 120.0, "continuous_batching": True, "max_batch_rows": 8, "max_batch_delay_ms": 5.0}


def test_round_trip_through_json() -> None:
    cfg = AgentConfig.model_validate(GOOD)
    assert cfg.ranks[1] == ("127.0.0.1", 1) and cfg.heartbeat.step_timeout_s == 30.0
    payload = AgentPayload(rank=1, device_id=1, model_files=["a"], config=cfg, distributed_address="127.0.0.1:6200",
                           status_fd=5, threads=1, keys_dir=None)
    assert AgentPayload.model_validate(payload.model_dump(mode="json")) == payload


@pytest.mark.parametrize(("change", "field"), [
    ({"group_timeout_s": None}, "group_timeout_s"),  # a setting that was never sent
    ({"surprise": 1}, "surprise"),  # a field this end does not know (another version)
    ({"store_port": "not a port"}, "store_port"),
    ({"heartbeat": {"interval_s": 1.0, "timeout_s": 3.0}}, "step_timeout_s"),
])
def test_bad_configs_name_the_field(change: dict, field: str) -> None:
    raw = {**GOOD, **change}
    if change.get("group_timeout_s", 0) is None:
        del raw["group_timeout_s"]
    with pytest.raises(ValidationError, match=field):
        AgentConfig.model_validate(raw)


def test_startup_process_explains_a_config_it_cannot_use() -> None:
    link = WorkerLink("127.0.0.1:1")
    try:
        with pytest.raises(RuntimeError, match=r"(?s)same servable_framework version .*surprise"):
            link._validated({**GOOD, "surprise": 1})
    finally:
        link.close()
