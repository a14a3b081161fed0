"""`start_servables` merging for real (contract §5.2): version 0 and the explicit newest version on one device
start ONE Worker; another version on the same (CPU) device is a second Worker, accepted; configs of one version
with different dec keys are refused before anything starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.support.procs import Rest, free_port, session_pids, wait_until

SERVER = '''
import json, sys
from servable_framework import server
from servable_framework.main import master

directory, rest, out = sys.argv[1:4]
results = {}

def workers():
    return sorted([h.payload["version"], h.payload["device_id"]] for h in master.get_master().workers.workers.values())

server.start_servables([server.ServableStartConfig(directory, "add", device_ids=0, version_number=0),
                        server.ServableStartConfig(directory, "add", device_ids=0, version_number=2)])
results["newest_twice"] = workers()
server.start_servables(server.ServableStartConfig(directory, "add", device_ids=0, version_number=1))
results["other_version_same_device"] = workers()
try:
    server.start_servables([server.ServableStartConfig(directory, "add", device_ids=1, version_number=1,
                                                       dec_key=b"k" * 16),
                            server.ServableStartConfig(directory, "add", device_ids=2, version_number=1,
                                                       num_parallel_workers=2)])
    results["different_keys"] = "started"
except RuntimeError as exc:
    results["different_keys"] = str(exc)
results["after_refusal"] = workers()
server.start_restful_server(rest)
with open(out, "w") as f:
    json.dump(results, f)
'''


def test_merge_and_device_sharing_through_real_workers(servers, add_dir, tmp_path) -> None:
    d = tmp_path / "servables"
    shutil.copytree(add_dir / "add", d / "add")
    shutil.copytree(d / "add" / "1", d / "add" / "2")
    (tmp_path / "merge_server.py").write_text(SERVER)
    before = set(session_pids())
    port = free_port()
    out = tmp_path / "results.json"
    proc = servers.start([str(tmp_path / "merge_server.py"), str(d), f"127.0.0.1:{port}", str(out)], "server")
    rest = Rest(port)

    def written() -> bool:
        assert proc.alive(), proc.log()[-4000:]
        return out.exists()

    wait_until(written, 180, "the results file")
    rest.wait_ready(proc, 60)
    results = json.loads(out.read_text())
    assert results["newest_twice"] == [[2, 0]]  # one Worker, not two
    assert results["other_version_same_device"] == [[1, 0], [2, 0]]  # CPU device 0 shared by two versions
    assert "The dec key or dec mode of servable name add is different in multiple configurations." in \
        results["different_keys"]
    assert results["after_refusal"] == [[1, 0], [2, 0]]  # the refused call started nothing
    assert len(set(session_pids()) - before - {proc.pid}) == 2  # two Worker processes in all
    logs = sorted(p.name for p in (tmp_path / "serving_logs").glob("*.log"))
    assert logs == ["log_add_device0_version1.log", "log_add_device0_version2.log"]
    body = {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 1.0], [1.0, 1.0]]}]}
    for url in ("/model/add:add_common", "/model/add/version/1:add_common", "/model/add/version/2:add_common"):
        r = rest.post(url, body)
        assert r.status_code == 200 and r.json() == {"instances": [{"y": [[2.0, 3.0], [4.0, 5.0]]}]}, url
    rest.close()


def test_version_0_resolves_before_merging_even_without_newest_given(tmp_path: Path) -> None:
    """Pure check of the order of operations: a servable with versions 1 and 3, version 0 given twice on two
    devices, is one config of version 3 (MindSpore resolves 0 first, then merges)."""
    from servable_framework.server import ServableStartConfig, merge_configs

    for v in ("1", "3"):
        (tmp_path / "s" / v).mkdir(parents=True)
    (tmp_path / "s" / "servable_config.py").write_text("")
    merged = merge_configs([ServableStartConfig(str(tmp_path), "s", device_ids=1),
                            ServableStartConfig(str(tmp_path), "s", device_ids=0, version_number=3)])
    assert [(c.version_number, c.device_ids) for c in merged] == [(3, [1, 0])]
