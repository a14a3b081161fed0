"""Local servables beyond the add example: a Python module + safetensors weights with dynamic batching, and
a Worker that dies being restarted by Main."""

from __future__ import annotations

import os
import re
import signal
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from servable_framework.client import Client
from tests.support.procs import wait_until

CONFIG = """
import torch
from servable_framework.server import register


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), x.sum(dim=-1)


def build():
    return Net()


net = register.declare_model("net.safetensors", "SafeTensors", with_batch_dim=True, module_factory=build,
                             max_batch_size=4, max_batch_delay_ms=100)


@register.register_method(output_names=["y", "s"])
def forward(x):
    y, s = register.add_stage(net, x, outputs_count=2)
    return y, s


def twice(x):
    y, _ = net.call(x)
    y2, _ = net.call(y[:, :1].repeat(4, axis=1) if y.ndim == 2 else y[:1].repeat(4))
    return y2


@register.register_method(output_names=["y"])
def chained(x):
    return register.add_stage(twice, x, outputs_count=1)
"""


@pytest.fixture(scope="module")
def linear_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("linear")
    (root / "linear" / "1").mkdir(parents=True)
    (root / "linear" / "servable_config.py").write_text(textwrap.dedent(CONFIG))
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    save_file({"fc.weight": w, "fc.bias": b}, str(root / "linear" / "1" / "net.safetensors"))
    return root, w.numpy().astype(np.float64), b.numpy().astype(np.float64)


def batch_counts(rest) -> tuple[int, int]:
    text = rest.get("/metrics").text
    b = sum(int(float(v)) for v in re.findall(r'^servable_model_batches_total\{[^}]*\} (\S+)', text, re.M))
    i = sum(int(float(v)) for v in re.findall(r'^servable_model_instances_total\{[^}]*\} (\S+)', text, re.M))
    return b, i


def test_safetensors_module_batched_across_requests(servers, linear_dir) -> None:
    root, w, b = linear_dir
    _, rest, zmq_address = servers.local(root, "linear")
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(4).astype(np.float32) for _ in range(8)]
    with Client(zmq_address, "linear", "forward") as client, ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda x: client.infer({"x": x}), xs))
    for x, out in zip(xs, outs):
        assert out[0]["y"].shape == (3,) and out[0]["s"].shape == ()
        np.testing.assert_allclose(out[0]["y"], x @ w.T + b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[0]["s"], x.sum(), rtol=1e-5)
    wait_until(lambda: batch_counts(rest)[1] >= 8, 10, "batch metrics")
    batches, instances = batch_counts(rest)
    assert instances == 8 and batches < 8, f"{batches} model calls for 8 concurrent instances: nothing was batched"
    # several instances in one request, and a wrong-sized one failing alone
    r = rest.post("/model/linear:forward", {"instances": [{"x": [1.0, 2.0, 3.0, 4.0]}, {"x": [0.0, 0.0, 0.0, 1.0]}]})
    ys = [np.array(i["y"]) for i in r.json()["instances"]]
    np.testing.assert_allclose(ys[0], np.array([1, 2, 3, 4]) @ w.T + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ys[1], w[:, 3] + b, rtol=1e-5, atol=1e-5)


def test_model_call_inside_a_stage(servers, linear_dir) -> None:
    root, w, b = linear_dir
    _, rest, _ = servers.local(root, "linear")
    x = np.array([0.5, -1.0, 2.0, 0.25])
    r = rest.post("/model/linear:chained", {"instances": [{"x": x.tolist()}]})
    y1 = x @ w.T + b
    expected = np.full(4, y1[0]) @ w.T + b
    np.testing.assert_allclose(np.array(r.json()["instances"][0]["y"]), expected, rtol=1e-4, atol=1e-4)


def test_dead_worker_is_restarted_by_main(servers, add_dir) -> None:
    server, rest, _ = servers.local(add_dir, "add", SERVABLE_HEARTBEAT_INTERVAL_S="0.5",
                                    SERVABLE_HEARTBEAT_TIMEOUT_S="2")
    body = {"instances": [{"x1": [[1.0, 1.0], [1.0, 1.0]], "x2": [[1.0, 1.0], [1.0, 1.0]]}]}
    assert rest.post("/model/add:add_common", body).status_code == 200
    from tests.integration.test_faults import children_of, cmdline

    worker = next(p for p in children_of(server.pid) if "servable_framework.worker" in cmdline(p))
    os.kill(worker, signal.SIGKILL)
    errors: list[str] = []

    def failed() -> bool:
        r = rest.post("/model/add:add_common", body)
        if r.status_code == 503:
            errors.append(r.json()["error_msg"])
        return bool(errors)

    wait_until(failed, 5, "the death to show", interval_s=0.02)
    assert "servable is not available" in errors[0] and "worker" in errors[0]
    wait_until(lambda: rest.is_ready(), 60, "the restarted worker")
    r = rest.post("/model/add:add_common", body)
    assert r.json() == {"instances": [{"y": [[2.0, 2.0], [2.0, 2.0]]}]}
    assert server.alive()


LEGACY_CONFIG = '''
import numpy as np
from servable_framework.server import register

register.declare_servable(servable_file="tensor_add.pt2", model_format="TorchExport", with_batch_dim=False)


def to_float(x1, x2):
    return np.asarray(x1, np.float32), np.asarray(x2, np.float32)


def negate(y):
    return -y


@register.register_method(output_names=["y"])
def add_negated(x1, x2):
    x1, x2 = register.call_preprocess(to_float, x1, x2)
    y = register.call_servable(x1, x2)
    y = register.call_postprocess(negate, y)
    return y
'''


def test_legacy_servable_config_serves(servers, add_dir, tmp_path) -> None:
    """A MindSpore 1.x servable_config.py (declare_servable, call_preprocess/call_servable/call_postprocess),
    with only the import changed, serves."""
    import shutil

    shutil.copytree(add_dir / "add", tmp_path / "legacy")
    (tmp_path / "legacy" / "servable_config.py").write_text(LEGACY_CONFIG)
    _, rest, _ = servers.local(tmp_path, "legacy")
    r = rest.post("/model/legacy:add_negated", {"instances": [{"x1": [[1, 2], [3, 4]], "x2": [[5, 6], [7, 8]]}]})
    assert r.status_code == 200, r.text
    assert r.json()["instances"][0]["y"] == [[-6.0, -8.0], [-10.0, -12.0]]
