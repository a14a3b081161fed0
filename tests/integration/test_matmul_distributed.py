"""The distributed MatMul servable for real: Main, Distributed Worker and Agents joined by torch.distributed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from servable_framework.client import Client
from tests.support.procs import REPO, Rest, child_env, free_port, session_pids, wait_until


def start_cluster(servers, servable_dir, ranks: int, wait: int = 0, agent_files: int | None = None,
                  start_agents: bool = True, also: list[str] | None = None, agent_args: tuple[str, ...] = (),
                  **env: str):
    """Main + Distributed Worker for `matmul` (plus ``also`` = [dir, name] of a local servable), and its Agents."""
    rest_port, zmq_port, dist_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{dist_port}"
    server = servers.start(["-m", "tests.support.serve", "distributed", "--dir", str(servable_dir), "--name", "matmul",
                            "--rank-table", str(servable_dir / f"rank_table_{ranks}pcs.json"), "--dist-address",
                            address, "--wait", str(wait), "--rest", f"127.0.0.1:{rest_port}", "--zmq",
                            f"127.0.0.1:{zmq_port}", *(["--also-local", *also] if also else [])], "server",
                           env=child_env(**env))
    agents = None
    if start_agents:
        files = [str(servable_dir / "model" / f"device{i}" / "matmul.safetensors") for i in range(agent_files or ranks)]
        agents = servers.start(["-m", "tests.support.agents", address, *files, *agent_args], "agents",
                               env=child_env(**env))
    return server, agents, Rest(rest_port), f"127.0.0.1:{zmq_port}"


@pytest.fixture(scope="module")
def cluster(module_servers, matmul_dir):
    server, agents, rest, zmq_address = start_cluster(module_servers, matmul_dir(2), 2)
    rest.wait_ready(server, 120)
    yield server, agents, rest, zmq_address
    rest.close()


def expected(x: np.ndarray) -> np.ndarray:
    return -(x.astype(np.float64) @ np.full((96, 16), 0.5)).astype(np.float32)


def test_rest_answer(cluster) -> None:
    _, _, rest, _ = cluster
    r = rest.post("/model/matmul:predict", {"instances": [{"x": np.ones((128, 96)).tolist()}]})
    assert r.status_code == 200
    y = np.array(r.json()["instances"][0]["y"])
    assert y.shape == (128, 16)
    assert (y == -48.0).all()


def test_zmq_answer_several_instances(cluster) -> None:
    _, _, rest, zmq_address = cluster
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((128, 96)).astype(np.float32) for _ in range(3)]
    with Client(zmq_address, "matmul", "predict") as client:
        result = client.infer([{"x": x} for x in xs])
    assert len(result) == 3
    for x, out in zip(xs, result):
        assert out["y"].dtype == np.float32 and out["y"].shape == (128, 16)
        np.testing.assert_allclose(out["y"], expected(x), rtol=1e-4, atol=1e-4)
    via_rest = rest.post("/model/matmul:predict", {"instances": [{"x": xs[0].tolist()}]}).json()
    np.testing.assert_allclose(np.array(via_rest["instances"][0]["y"], np.float32), result[0]["y"], rtol=1e-6)


def test_bad_shape_is_an_instance_error_and_cluster_keeps_serving(cluster) -> None:
    _, _, rest, _ = cluster
    r = rest.post("/model/matmul:predict", {"instances": [{"x": [[1.0, 2.0]]}]})
    assert "input x must be [rows, 96]" in r.json()["error_msg"]
    r = rest.post("/model/matmul:predict", {"instances": [{"x": np.ones((4, 96)).tolist()}]})
    assert (np.array(r.json()["instances"][0]["y"]) == -48.0).all()


def test_agents_with_wrong_rank_count_fail_with_contract_message(servers, matmul_dir) -> None:
    """A rank table with 3 ranks for a servable declared with rank_size=2."""
    d = matmul_dir(2)
    from tests.conftest import write_rank_table

    write_rank_table(d / "rank_table_2pcs.json", 3)
    server, _, rest, _ = start_cluster(servers, d, 2, wait=5, start_agents=False)
    code = server.wait(60)
    assert code != 0
    assert "Rank size 3 declared in rank table file" in server.log()
    assert "not equal to 2 declared in servable config" in server.log()


def test_no_agents_within_wait_time_fails_with_contract_message(servers, matmul_dir) -> None:
    server, _, _, _ = start_cluster(servers, matmul_dir(2), 2, wait=5, start_agents=False)
    start = time.monotonic()
    code = server.wait(60)
    assert code != 0
    assert time.monotonic() - start < 30
    assert "Failed to wait for ready of all agents, current agents count: 0, rank size: 2" in server.log()
    wait_until(lambda: not any(p for p in session_pids() if p == server.pid), 10, "server gone")


def test_agents_failing_to_load_fail_the_start(servers, matmul_dir, tmp_path) -> None:
    d = matmul_dir(2)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    rest_port, dist_port = free_port(), free_port()
    address = f"127.0.0.1:{dist_port}"
    server = servers.start(["-m", "tests.support.serve", "distributed", "--dir", str(d), "--name", "matmul",
                            "--rank-table", str(d / "rank_table_2pcs.json"), "--dist-address", address,
                            "--wait", "60", "--rest", f"127.0.0.1:{rest_port}"], "server")
    agents = servers.start(["-m", "tests.support.agents", address, str(d / "model/device0/matmul.safetensors"),
                            str(broken)], "agents")
    assert agents.wait(90) != 0
    assert server.wait(60) != 0
    log = server.log()
    assert "Failed to starting all agents" in log
    # the cause is named even when the exit of the healthy rank 0 (stopped because of it) reaches the Worker first
    failure = next(line for line in log.splitlines() if "Failed to starting all agents" in line)
    assert "rank 1" in failure and "failed" in failure


@pytest.mark.slow
def test_example_8_ranks_as_documented(servers) -> None:
    """examples/matmul_distributed run as its README says: from its folder, fixed example addresses."""
    example = REPO / "examples" / "matmul_distributed"
    server = servers.start(["serving_server.py"], "example-server", cwd=example)
    agents = servers.start(["serving_agent.py"], "example-agents", cwd=example)
    rest = Rest(1500)
    rest.wait_ready(server, 180)
    assert agents.alive()
    r = rest.post("/model/matmul:predict", {"instances": [{"x": np.ones((128, 96)).tolist()}]})
    y = np.array(r.json()["instances"][0]["y"])
    assert y.shape == (128, 16) and (y == -48.0).all()
    with Client("127.0.0.1:5500", "matmul", "predict") as client:
        out = client.infer({"x": np.ones((128, 96), np.float32)})
    np.testing.assert_array_equal(out[0]["y"], np.full((128, 16), -48.0, np.float32))
    server.stop()
    agents.wait(60)  # the servable stopped: the agents leave on their own
    rest.close()


def test_pipeline_stages_with_batching(servers, matmul_dir) -> None:
    """2 stages x 2 TP: activations flow stage to stage over torch.distributed send/recv; concurrent
    requests are batched and two batches may be in flight."""
    from concurrent.futures import ThreadPoolExecutor

    d = matmul_dir(4, 2, batch=True)
    server, _, rest, zmq_address = start_cluster(servers, d, 4)
    rest.wait_ready(server, 120)
    r = rest.post("/model/matmul:predict", {"instances": [{"x": np.ones((16, 96)).tolist()}]})
    assert (np.array(r.json()["instances"][0]["y"]) == -48.0).all()
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((16, 96)).astype(np.float32) for _ in range(12)]
    w0, w1 = np.eye(96), np.full((96, 16), 0.5)
    with Client(zmq_address, "matmul", "predict") as client, ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda x: client.infer({"x": x}), xs))
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out[0]["y"], -(x.astype(np.float64) @ w0 @ w1), rtol=1e-4, atol=1e-4)
    # a batch stage 0 rejects is failed by every stage alike (none left waiting on a recv); serving goes on
    bad = rest.post("/model/matmul:predict", {"instances": [{"x": np.ones((16, 5)).tolist()}]})
    assert "input x must be [rows, 96] float32, got shape [16, 5]" in bad.text, bad.text
    r = rest.post("/model/matmul:predict", {"instances": [{"x": np.ones((16, 96)).tolist()}]})
    assert r.status_code == 200 and (np.array(r.json()["instances"][0]["y"]) == -48.0).all(), r.text
