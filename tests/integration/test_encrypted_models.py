"""Encrypted model files served for real (contract §5.1 / §6.3 ``dec_key``, ``dec_mode``): a local `.pt2` in a
Worker and MatMul safetensors shards on Agents answer like their plaintext; a wrong key fails the start with
"decryption failed" and leaves no process behind; the key shows up in no log and not in ``/metrics``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from servable_framework import crypto
from servable_framework.crypto import ModelKey
from tests.support.procs import Rest, free_port, session_pids, wait_until

SERVER = '''
import sys
from servable_framework import crypto, server

directory, name, rest, key_file, mode = sys.argv[1:6]
key = crypto.read_key_file(key_file)
server.start_servables(server.ServableStartConfig(directory, name, device_ids=0, dec_key=key, dec_mode=mode))
server.start_restful_server(rest)
'''

AGENTS = '''
import sys
from servable_framework import crypto
from servable_framework.server import distributed

address, key_file, mode, *files = sys.argv[1:]
distributed.startup_agents(address, model_files=files, dec_key=crypto.read_key_file(key_file), dec_mode=mode)
'''


def write_key(path: Path, size: int = 32) -> bytes:
    """A random key whose hex and raw bytes we can search the logs for."""
    key = np.random.default_rng().bytes(size)
    path.write_bytes(key)
    return key


def encrypted_add_dir(add_dir: Path, root: Path, key: bytes, mode: str) -> Path:
    """A copy of the `add` servable with its `.pt2` replaced by the encrypted file (same name)."""
    shutil.copytree(add_dir / "add", root / "add")
    model = root / "add" / "1" / "tensor_add.pt2"
    model.write_bytes(crypto.encrypt(model.read_bytes(), ModelKey(key, mode)))
    return root


def assert_key_nowhere(key: bytes, *texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        assert key.hex().encode() not in data and key.hex().upper().encode() not in data
        assert key not in data and repr(key).encode() not in data


def logs_under(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in folder.rglob("*.log")]


def new_pids(before: set[int]) -> set[int]:
    return set(session_pids()) - before


@pytest.mark.parametrize("mode", crypto.MODES)
def test_local_encrypted_pt2_answers_like_plaintext(servers, add_dir, tmp_path, mode) -> None:
    key = write_key(tmp_path / "model.key")
    d = encrypted_add_dir(add_dir, tmp_path / "enc", key, mode)
    (tmp_path / "encrypted_server.py").write_text(SERVER)
    port = free_port()
    proc = servers.start([str(tmp_path / "encrypted_server.py"), str(d), "add", f"127.0.0.1:{port}",
                          str(tmp_path / "model.key"), mode], "server")
    rest = Rest(port)
    rest.wait_ready(proc, 120)
    x1, x2 = [[1.5, 2.0], [3.0, -4.25]], [[0.5, 0.25], [10.0, 4.0]]
    for method in ("add_common", "add_cast"):
        r = rest.post(f"/model/add:{method}", {"instances": [{"x1": x1, "x2": x2}]})
        assert r.status_code == 200, r.text
        assert r.json() == {"instances": [{"y": (np.array(x1) + np.array(x2)).tolist()}]}
    metrics = rest.get("/metrics").text
    rest.close()
    assert_key_nowhere(key, metrics, proc.log(), *logs_under(tmp_path))
    # nothing decrypted was written next to the model
    assert sorted(p.name for p in (d / "add").rglob("*")) == sorted(p.name for p in (add_dir / "add").rglob("*"))


def test_local_wrong_key_fails_the_start_cleanly(servers, add_dir, tmp_path) -> None:
    right = write_key(tmp_path / "right.key")
    wrong = write_key(tmp_path / "wrong.key")
    d = encrypted_add_dir(add_dir, tmp_path / "enc", right, "AES-GCM")
    (tmp_path / "encrypted_server.py").write_text(SERVER)
    before = set(session_pids())
    proc = servers.start([str(tmp_path / "encrypted_server.py"), str(d), "add", f"127.0.0.1:{free_port()}",
                          str(tmp_path / "wrong.key"), "AES-GCM"], "server")
    assert proc.wait(120) != 0
    log = proc.log()
    assert "Fail to start workers" in log and "decryption failed for model file" in log, log[-3000:]
    assert "wrong dec_key" in log
    wait_until(lambda: not new_pids(before), 30, "every process of the failed start to exit")
    assert_key_nowhere(right, log, *logs_under(tmp_path))
    assert_key_nowhere(wrong, log, *logs_under(tmp_path))


def encrypted_shards(matmul_dir, root: Path, key: bytes, mode: str) -> tuple[Path, list[str]]:
    d = matmul_dir(2)
    files = []
    for i in range(2):
        plain = d / "model" / f"device{i}" / "matmul.safetensors"
        enc = root / f"device{i}.safetensors"
        enc.write_bytes(crypto.encrypt(plain.read_bytes(), ModelKey(key, mode)))
        files.append(str(enc))
    return d, files


def start_distributed(servers, d: Path, tmp_path: Path, key_file: Path, mode: str, files: list[str]):
    rest_port, dist_port = free_port(), free_port()
    address = f"127.0.0.1:{dist_port}"
    server = servers.start(["-m", "tests.support.serve", "distributed", "--dir", str(d), "--name", "matmul",
                            "--rank-table", str(d / "rank_table_2pcs.json"), "--dist-address", address,
                            "--wait", "120", "--rest", f"127.0.0.1:{rest_port}"], "server")
    (tmp_path / "encrypted_agents.py").write_text(AGENTS)
    agents = servers.start([str(tmp_path / "encrypted_agents.py"), address, str(key_file), mode, *files], "agents")
    return server, agents, Rest(rest_port)


def test_distributed_encrypted_shards_answer_like_plaintext(servers, matmul_dir, tmp_path) -> None:
    key = write_key(tmp_path / "model.key", 16)
    d, files = encrypted_shards(matmul_dir, tmp_path, key, "AES-CBC")
    server, agents, rest = start_distributed(servers, d, tmp_path, tmp_path / "model.key", "AES-CBC", files)
    rest.wait_ready(server, 180)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 96)).astype(np.float32)
    r = rest.post("/model/matmul:predict", {"instances": [{"x": x.tolist()}]})
    assert r.status_code == 200, r.text
    expected = -(x.astype(np.float64) @ np.full((96, 16), 0.5))
    np.testing.assert_allclose(np.array(r.json()["instances"][0]["y"]), expected, rtol=1e-4, atol=1e-4)
    metrics = rest.get("/metrics").text
    rest.close()
    assert agents.alive()
    assert_key_nowhere(key, metrics, server.log(), agents.log(), *logs_under(tmp_path))


def test_distributed_wrong_key_fails_agent_startup(servers, matmul_dir, tmp_path) -> None:
    right = write_key(tmp_path / "right.key")
    wrong = write_key(tmp_path / "wrong.key")
    d, files = encrypted_shards(matmul_dir, tmp_path, right, "AES-GCM")
    before = set(session_pids())
    server, agents, rest = start_distributed(servers, d, tmp_path, tmp_path / "wrong.key", "AES-GCM", files)
    rest.close()
    assert agents.wait(120) != 0
    assert "Failed to start agents" in agents.log() and "decryption failed for model file" in agents.log()
    assert server.wait(60) != 0
    assert "Failed to starting all agents" in server.log() and "decryption failed" in server.log()
    wait_until(lambda: not new_pids(before), 30, "every process of the failed start to exit")
    for key in (right, wrong):
        assert_key_nowhere(key, server.log(), agents.log(), *logs_under(tmp_path))


SAFETENSORS_CONFIG = """
import torch
from servable_framework.server import register


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


net = register.declare_model("net.safetensors", "SafeTensors", with_batch_dim=True, module_factory=Net)


@register.register_method(output_names=["y"])
def forward(x):
    return register.add_stage(net, x, outputs_count=1)
"""


def test_local_encrypted_safetensors_answers_like_plaintext(servers, tmp_path) -> None:
    import torch
    from safetensors.torch import save

    torch.manual_seed(0)
    weights = {"fc.weight": torch.randn(3, 4), "fc.bias": torch.randn(3)}
    key = write_key(tmp_path / "model.key", 16)
    (tmp_path / "net" / "1").mkdir(parents=True)
    (tmp_path / "net" / "servable_config.py").write_text(SAFETENSORS_CONFIG)
    (tmp_path / "net" / "1" / "net.safetensors").write_bytes(crypto.encrypt(save(weights), ModelKey(key, "AES-CBC")))
    (tmp_path / "encrypted_server.py").write_text(SERVER)
    port = free_port()
    proc = servers.start([str(tmp_path / "encrypted_server.py"), str(tmp_path), "net", f"127.0.0.1:{port}",
                          str(tmp_path / "model.key"), "AES-CBC"], "server")
    rest = Rest(port)
    rest.wait_ready(proc, 120)
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
    r = rest.post("/model/net:forward", {"instances": [{"x": row.tolist()} for row in x]})
    assert r.status_code == 200, r.text
    expected = x @ weights["fc.weight"].numpy().T + weights["fc.bias"].numpy()
    got = np.array([inst["y"] for inst in r.json()["instances"]], np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    rest.close()
    assert_key_nowhere(key, proc.log(), *logs_under(tmp_path))
