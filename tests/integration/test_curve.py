"""Authenticated ZMQ links (CurveZMQ), for real: Main's ZMQ front end and the Distributed Worker of a 2-Agent
MatMul servable run with a keys directory (``SERVABLE_KEYS_DIR``, inherited by every process); Agents holding
the keys register and serve; a Client or an "Agent" without an authorized key is refused during the handshake,
logged, and changes nothing for the requests of authorized clients running meanwhile. Binding a non-loopback
address without keys is a start error that names the command creating them.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from servable_framework import curve
from servable_framework.client import Client
from tests.integration.test_matmul_distributed import expected, start_cluster
from tests.support.procs import PYTHON, REPO, child_env, free_port, wait_until

X = np.random.default_rng(3).standard_normal((4, 96)).astype(np.float32)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return curve.create(tmp_path_factory.mktemp("keys") / "cluster")


@pytest.fixture(scope="module")
def intruder(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Path:
    """Keys of another deployment, holding the right server public key: its client key is simply not authorized."""
    other = curve.create(tmp_path_factory.mktemp("keys") / "other")
    shutil.copy(keys / "server.key", other / "server.key")
    return other


@pytest.fixture(scope="module")
def secured(module_servers, matmul_dir, keys: Path):
    server, agents, rest, zmq_address = start_cluster(module_servers, matmul_dir(2), 2, SERVABLE_KEYS_DIR=str(keys))
    rest.wait_ready(server, 120)
    yield server, agents, rest, zmq_address
    rest.close()


def _worker_log(server) -> str:
    return (Path(server.log_path).parent / "serving_logs" / "log_matmul_distributed.log").read_text()


def test_agents_with_the_key_register_and_clients_with_the_key_are_served(secured, keys: Path) -> None:
    server, _, _, zmq_address = secured
    with Client(zmq_address, "matmul", "predict", keys_dir=keys, timeout_s=30) as client:
        out = client.infer({"x": X})
        # a loopback Client asks for Main's local unix socket; beside a keyed front end there is none, so every
        # call shows an authorized key
        assert zmq_address.startswith("127.") and client._local_path == ""
    assert isinstance(out, list), out
    np.testing.assert_allclose(out[0]["y"], expected(X), rtol=1e-4, atol=1e-4)
    assert "(CurveZMQ: authorized keys only)" in server.log()
    assert "(CurveZMQ: authorized keys only)" in _worker_log(server)


def test_clients_without_an_authorized_key_are_refused_and_traffic_goes_on(secured, keys: Path,
                                                                           intruder: Path) -> None:
    server, _, _, zmq_address = secured
    stop = threading.Event()
    answers: list[object] = []

    def authorized_traffic() -> None:
        with Client(zmq_address, "matmul", "predict", keys_dir=keys, timeout_s=30) as client:
            while not stop.is_set():
                answers.append(client.infer({"x": X}))

    thread = threading.Thread(target=authorized_traffic)
    thread.start()
    try:
        wait_until(lambda: len(answers) >= 2, 60, "authorized requests to flow")
        for keys_dir in (None, intruder):  # no key at all; a key the server does not know
            with Client(zmq_address, "matmul", "predict", keys_dir=keys_dir, connect_timeout_s=2,
                        timeout_s=5) as client:
                refused = client.infer({"x": X})
            assert isinstance(refused, dict) and "unavailable" in refused["error"], refused
        before = len(answers)
        wait_until(lambda: len(answers) >= before + 2, 60, "authorized requests to go on")
    finally:
        stop.set()
        thread.join(60)
    assert all(isinstance(a, list) and np.allclose(a[0]["y"], expected(X), rtol=1e-4, atol=1e-4) for a in answers)
    log = server.log()
    key = (intruder / "client.key").read_text().split('public-key = "')[1].split('"')[0]
    assert f"refused a connection from 127.0.0.1: its key {key} is not in authorized/" in log
    assert "refused a connection that failed the CURVE handshake" in log  # the client without a key


def _try_register(address: str, keys_dir: Path | None) -> list[bytes] | None:
    """Ask the Distributed Worker for an agent config as a startup process does; its answer, or None."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if keys_dir is not None:
        curve.secure_client(sock, curve.CurveKeys(keys_dir))
    sock.connect(f"tcp://{address}")
    try:
        sock.send_multipart([b"C", msgpack.packb({"v": 1, "lost": [], "req": 1})], zmq.NOBLOCK)
    except zmq.Again:
        return None
    try:
        return sock.recv_multipart() if sock.poll(3000) else None
    finally:
        sock.close(0)
        ctx.term()


def test_an_agent_without_an_authorized_key_cannot_register(secured, keys: Path, intruder: Path) -> None:
    server, _, rest, _ = secured
    address = server_dist_address(server)
    assert _try_register(address, keys) is not None  # the check itself works: the right key gets an answer
    assert _try_register(address, intruder) is None
    assert _try_register(address, None) is None
    log = _worker_log(server)
    assert "refused a connection from 127.0.0.1" in log
    r = rest.post("/model/matmul:predict", {"instances": [{"x": X.tolist()}]})
    assert r.status_code == 200 and np.allclose(r.json()["instances"][0]["y"], expected(X), rtol=1e-4, atol=1e-4)


def server_dist_address(server) -> str:
    args = server.popen.args
    return args[args.index("--dist-address") + 1]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    e = child_env(**env)
    e.pop("SERVABLE_KEYS_DIR", None)
    return subprocess.run([PYTHON, *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=120)


def test_binding_off_loopback_without_keys_is_a_start_error(add_dir, matmul_dir) -> None:
    zmq_front = _run(["-m", "tests.support.serve", "local", "--dir", str(add_dir), "--name", "add", "--zmq",
                      f"0.0.0.0:{free_port()}"])
    assert zmq_front.returncode != 0
    assert "The ZMQ front end would listen on 0.0.0.0:" in zmq_front.stderr + zmq_front.stdout
    assert "python -m servable_framework.keys create DIR" in zmq_front.stderr + zmq_front.stdout
    root = matmul_dir(2)
    worker = _run(["-m", "tests.support.serve", "distributed", "--dir", str(root), "--name", "matmul",
                   "--rank-table", str(root / "rank_table_2pcs.json"), "--dist-address", f"0.0.0.0:{free_port()}"])
    assert worker.returncode != 0
    assert "The distributed worker would listen on 0.0.0.0:" in worker.stderr + worker.stdout
    agent = _run(["-m", "tests.support.agents", "10.255.255.1:6200", str(root / "model" / "device0" /
                                                                          "matmul.safetensors")])
    assert agent.returncode != 0
    assert "An Agent connects to 10.255.255.1:6200, which is not a loopback address" in agent.stderr + agent.stdout


def test_keys_cli_writes_a_usable_directory(tmp_path: Path) -> None:
    done = _run(["-m", "servable_framework.keys", "create", str(tmp_path / "k")])
    assert done.returncode == 0, done.stderr
    k = curve.CurveKeys(tmp_path / "k")
    assert k.server_public() == k.server_pair()[0] and k.client_pair()[0] in k.authorized()
    assert (tmp_path / "k" / "server.key_secret").stat().st_mode & 0o077 == 0
    again = _run(["-m", "servable_framework.keys", "create", str(tmp_path / "k")])
    assert again.returncode != 0 and "is not empty" in again.stderr
    added = _run(["-m", "servable_framework.keys", "add-client", str(tmp_path / "k"), "ci"])
    assert added.returncode == 0, added.stderr
    ci = curve.CurveKeys(tmp_path / "k" / "clients" / "ci")
    assert ci.client_pair()[0] in k.authorized() and ci.server_public() == k.server_public()
