"""Start-argument rules that need no running servable: `startup_agents` (contract §6.3, checked before the Worker
is even asked for its config) and the merging of `ServableStartConfig`s (§5.2)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from servable_framework.server import ServableStartConfig, merge_configs
from servable_framework.server import _check_exclusive_devices as check_exclusive
from servable_framework.server.distributed import startup_agents
from servable_framework.testing import free_port

KEY = b"0123456789abcdef"
PAIR = ("Parameter 'agent_ip' and parameter 'rank_start' must have values at the same time, or both None at the "
        "same time.")


def start(**kw: object) -> None:
    """`startup_agents` against an address where nothing listens: a rule that is checked first raises at once,
    before anything connects or starts (else the config fetch would wait its whole timeout)."""
    args: dict[str, object] = {"distributed_address": f"127.0.0.1:{free_port()}", "model_files": ["a.safetensors"],
                               "config_timeout_s": 30.0}
    args.update(kw)
    t0 = time.monotonic()
    try:
        startup_agents(**args)  # type: ignore[arg-type]
    finally:
        assert time.monotonic() - t0 < 10, "the rule was not checked before the config fetch"


@pytest.mark.parametrize("kw", [{"agent_ip": "127.0.0.1"}, {"rank_start": 0}, {"rank_start": 3}])
def test_agent_ip_and_rank_start_come_together(kw: dict[str, object]) -> None:
    with pytest.raises(RuntimeError, match=PAIR.replace(".", r"\.")):
        start(**kw)


@pytest.mark.parametrize("port", [0, 65535 - 6, 70000])
def test_agent_start_port_range(port: int) -> None:
    with pytest.raises(RuntimeError, match=r"Parameter 'agent_start_port' should be in range \[1,65528\]"):
        start(agent_start_port=port)


def test_agent_ip_must_be_this_machines() -> None:
    with pytest.raises(RuntimeError, match="Check ip 'agent_ip' valid failed, agent_ip: 203.0.113.7"):
        start(agent_ip="203.0.113.7", rank_start=0)
    with pytest.raises(RuntimeError, match="Parameter 'rank_start' should be >= 0"):
        start(agent_ip="127.0.0.1", rank_start=-1)


def test_model_and_group_file_shapes() -> None:
    with pytest.raises(RuntimeError, match="Parameter 'model_files' should be str or tuple/list of str"):
        start(model_files=7)
    with pytest.raises(RuntimeError, match="The item of parameter 'model_files' should be str"):
        start(model_files=["a", 3])
    with pytest.raises(RuntimeError, match="please check the number of  model files and group config files"):
        start(model_files=[["a", "b"], ["c"]])
    with pytest.raises(RuntimeError, match="Model files count 2 does not equal to group config files count 1 when "
                                           "group_config_files is not None"):
        start(model_files=["a", "b"], group_config_files=["g"])
    with pytest.raises(RuntimeError, match="please check the number of  group config files, currently only "
                                           "support one at most"):
        start(model_files=["a"], group_config_files=[["g1", "g2"]])


def test_dec_key_and_mode() -> None:
    with pytest.raises(RuntimeError, match="Parameter 'dec_key' length 3 expected to be 16, 24 or 32"):
        start(dec_key=b"abc")
    with pytest.raises(RuntimeError, match="Parameter 'dec_mode' expected to be 'AES-GCM' or 'AES-CBC'"):
        start(dec_key=KEY, dec_mode="AES-ECB")


# -- merging (contract §5.2) ---------------------------------------------------------------------------------
@pytest.fixture
def versions(tmp_path: Path) -> Path:
    """A servable `add` with version folders 1 and 2 (2 is the newest)."""
    (tmp_path / "add" / "1").mkdir(parents=True)
    (tmp_path / "add" / "2").mkdir()
    (tmp_path / "add" / "servable_config.py").write_text("")
    return tmp_path


def test_version_0_and_the_newest_merge_into_one(versions: Path) -> None:
    d = str(versions)
    merged = merge_configs([ServableStartConfig(d, "add", device_ids=0, version_number=0),
                            ServableStartConfig(d, "add", device_ids=[0, 1], version_number=2, num_parallel_workers=3),
                            ServableStartConfig(d, "add", device_ids=0, version_number=1)])
    assert [(c.version_number, c.device_ids, c.num_parallel_workers) for c in merged] == [(2, [0, 1], 3), (1, [0], 0)]


def test_different_keys_for_one_version_are_refused_other_versions_may_differ(versions: Path) -> None:
    d = str(versions)
    with pytest.raises(RuntimeError, match="The dec key or dec mode of servable name add is different in multiple "
                                           r"configurations\."):
        merge_configs([ServableStartConfig(d, "add", device_ids=0, dec_key=KEY),
                       ServableStartConfig(d, "add", device_ids=1, version_number=2)])
    with pytest.raises(RuntimeError, match="The dec key or dec mode of servable name add is different"):
        merge_configs([ServableStartConfig(d, "add", device_ids=0, dec_key=KEY),
                       ServableStartConfig(d, "add", device_ids=1, dec_key=KEY, dec_mode="AES-CBC")])
    merged = merge_configs([ServableStartConfig(d, "add", device_ids=0, version_number=1, dec_key=KEY),
                            ServableStartConfig(d, "add", device_ids=0, version_number=2, dec_key=KEY[::-1])])
    assert len(merged) == 2
    same = merge_configs([ServableStartConfig(d, "add", device_ids=0, dec_key=KEY, dec_mode="AES-CBC"),
                          ServableStartConfig(d, "add", device_ids=1, version_number=2, dec_key=KEY,
                                              dec_mode="AES-CBC")])
    assert len(same) == 1 and same[0].device_ids == [0, 1]


def test_exclusive_devices_option(versions: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``allow_reuse_device=False``: a CUDA device id serves one Worker; CPU ids stay shareable."""
    d = str(versions)
    two_versions = merge_configs([ServableStartConfig(d, "add", device_ids=0, version_number=1),
                                  ServableStartConfig(d, "add", device_ids=0, version_number=2)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_exclusive(two_versions, [])  # CPU: shared
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="GPU device id 0 is used repeatedly in servable add"):
        check_exclusive(two_versions, [])
    with pytest.raises(RuntimeError, match="GPU device id 0 is used repeatedly in servable add"):
        check_exclusive(two_versions[:1], [{"device_id": 0, "device_type": None}])  # held by a running Worker
    check_exclusive(two_versions[:1], [{"device_id": 1, "device_type": None}])
    cpu = merge_configs([ServableStartConfig(d, "add", device_ids=0, version_number=1, device_type="CPU"),
                         ServableStartConfig(d, "add", device_ids=0, version_number=2, device_type="cpu")])
    check_exclusive(cpu, [])
