"""`startup_agents` rules that need the rank table (contract §6.3): model-file count vs this host's ranks,
``rank_start`` within the rank size, readable files. Each refused call starts no Agent and leaves the waiting
Distributed Worker untouched: correct Agents (``agent_ip`` + ``rank_start``) join it afterwards."""

from __future__ import annotations

import json
import subprocess

import numpy as np

from tests.support.procs import PYTHON, Rest, child_env, free_port, session_pids, wait_until

DRIVER = '''
import json, sys
from servable_framework.server import distributed

distributed.startup_agents(sys.argv[1], **json.loads(sys.argv[2]))
'''


def test_rank_table_rules_then_a_good_start(servers, matmul_dir, tmp_path) -> None:
    d = matmul_dir(2)
    rest_port, dist_port = free_port(), free_port()
    address = f"127.0.0.1:{dist_port}"
    server = servers.start(["-m", "tests.support.serve", "distributed", "--dir", str(d), "--name", "matmul",
                            "--rank-table", str(d / "rank_table_2pcs.json"), "--dist-address", address,
                            "--wait", "300", "--rest", f"127.0.0.1:{rest_port}"], "server")
    (tmp_path / "start_agents_driver.py").write_text(DRIVER)
    wait_until(lambda: len(session_pids()) >= 2, 60, "the Distributed Worker process")  # Main + its Worker
    files = [str(d / "model" / f"device{i}" / "matmul.safetensors") for i in range(2)]

    def refused(**kw: object) -> str:
        before = set(session_pids())
        out = subprocess.run([PYTHON, str(tmp_path / "start_agents_driver.py"), address, json.dumps(kw)],
                             capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=120)
        assert out.returncode != 0
        assert set(session_pids()) <= before  # no Agent was started
        return out.stderr

    assert "Card count [0, 1] described rank table does not equal to model files size 1" in \
        refused(model_files=files[:1])
    assert "Card count [0, 1] described rank table does not equal to model files size 3" in \
        refused(model_files=[*files, files[0]], agent_ip="127.0.0.1", rank_start=1)
    assert "Parameter 'rank_start' cannot equal or larger than rank size 2." in \
        refused(model_files=files, agent_ip="127.0.0.1", rank_start=2)
    missing = str(tmp_path / "missing.safetensors")
    assert f"Cannot access model file '{missing}'" in refused(model_files=[files[0], missing])
    assert server.alive()

    agents = servers.start([str(tmp_path / "start_agents_driver.py"), address,
                            json.dumps({"model_files": files, "agent_ip": "127.0.0.1", "rank_start": 0})], "agents")
    rest = Rest(rest_port)
    rest.wait_ready(server, 180)
    r = rest.post("/model/matmul:predict", {"instances": [{"x": np.ones((4, 96)).tolist()}]})
    assert r.status_code == 200 and (np.array(r.json()["instances"][0]["y"]) == -48.0).all()
    assert agents.alive()
    rest.close()
