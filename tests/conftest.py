"""Shared fixtures: servable folders built in tmp dirs (models exported, never committed), real servers.

At the end of the session any process started by the suite that is still running fails the run.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.procs import REPO, Proc, Rest, free_port, kill_session_leftovers

EXAMPLES = REPO / "examples"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
        for item in gpu_items:
            item.add_marker(skip)


def _cuda_available() -> bool:
    import torch  # only imported when gpu-marked tests were collected

    return bool(torch.cuda.is_available())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed test shows the log tails of the servers it started: CI keeps nothing else."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    for fixture in ("servers", "module_servers"):
        started = funcargs.get(fixture)
        for proc in getattr(started, "procs", []):
            tail = proc.log()[-6000:]
            report.sections.append((f"log of {proc.name} (pid {proc.pid})", tail))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = kill_session_leftovers()
    if left:
        print(f"\nERROR: processes started by the test suite were still running: {left}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def add_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A servable directory holding `add` (the tensor_add example's config) with its model exported."""
    root = tmp_path_factory.mktemp("servables")
    (root / "add").mkdir()
    shutil.copy(EXAMPLES / "tensor_add" / "add" / "servable_config.py", root / "add" / "servable_config.py")
    _load(EXAMPLES / "tensor_add" / "export_model" / "add_model.py", "add_model").export(str(root))
    return root


MATMUL_CONFIG = '''
from servable_framework.server import distributed, register

model = distributed.declare_servable(rank_size={ranks}, stage_size={stages}, with_batch_dim={batch},
                                     enable_pipeline_infer={pipeline}, shard="matmul")


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
'''


def write_rank_table(path: Path, ranks: int) -> Path:
    devices = [{"device_id": str(i), "device_ip": f"192.{i + 1}.27.6", "rank_id": str(i)} for i in range(ranks)]
    path.write_text(json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                                "server_list": [{"server_id": "127.0.0.1", "device": devices}]}))
    return path


@pytest.fixture(scope="session")
def matmul_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: a servable directory with a `matmul` of ``ranks`` x ``stages``, its shard files and rank table."""
    export = _load(EXAMPLES / "matmul_distributed" / "export_model" / "distributed_inference.py", "mm_export").export

    def make(ranks: int = 2, stages: int = 1, batch: bool = False) -> Path:
        root = tmp_path_factory.mktemp(f"matmul{ranks}x{stages}")
        (root / "matmul").mkdir()
        (root / "matmul" / "servable_config.py").write_text(MATMUL_CONFIG.format(ranks=ranks, stages=stages,
                                                                                 batch=batch, pipeline=stages > 1))
        export(str(root / "model"), ranks, stages)
        write_rank_table(root / f"rank_table_{ranks}pcs.json", ranks)
        return root

    return make


class Servers:
    """Starts test servers/agents under one tmp dir and stops them all at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def start(self, args: list[str], name: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(args, cwd or self.tmp, name, self.tmp, env)
        self.procs.append(proc)
        return proc

    def local(self, servable_dir: Path, name: str, **env: str) -> tuple[Proc, Rest, str]:
        from tests.support.procs import child_env

        rest_port, zmq_port = free_port(), free_port()
        proc = self.start(["-m", "tests.support.serve", "local", "--dir", str(servable_dir), "--name", name,
                           "--rest", f"127.0.0.1:{rest_port}", "--zmq", f"127.0.0.1:{zmq_port}",
                           "--device-ids", "0"], f"server-{name}", env=child_env(**env))
        rest = Rest(rest_port)
        rest.wait_ready(proc, 90)
        return proc, rest, f"127.0.0.1:{zmq_port}"

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    yield s
    s.stop_all()


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    s = Servers(tmp_path_factory.mktemp("servers"))
    yield s
    s.stop_all()
