"""Counts given to ``add_stage`` for a model are checked against the loaded model when the Worker starts
(contract §3.4, §5.2): ``start_servables`` fails with the Worker's text, no request is needed to find out.

A ``.pt2`` program knows its inputs and outputs counts; a Python module (``SafeTensors``) knows its inputs count
from ``forward``'s fixed positional parameters, and its outputs count only once it runs: that mismatch still
surfaces at the first request (the last test pins that documented limit)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.support.servables.multigraph.export_model import export

# start_servables in its own process; its outcome is the last line of the output
START = """
import sys
from servable_framework import server
try:
    server.start_servables(server.ServableStartConfig(sys.argv[1], sys.argv[2], device_ids=0))
except Exception as exc:
    print("START ERROR:", exc, flush=True)
    sys.exit(3)
print("STARTED", flush=True)
server.stop()
"""

HEADER = """
from servable_framework.server import register

model = register.declare_model(["affine.pt2", "stats.pt2"], "TorchExport", with_batch_dim=True)
"""
KEY = "affine.pt2;stats.pt2"


def start_error(servers, root: Path, name: str) -> str:
    proc = servers.start(["-c", START, str(root), name], f"start-{name}")
    assert proc.wait(180) == 3, proc.log()
    line = next(line for line in proc.log().splitlines() if line.startswith("START ERROR: "))
    return line.removeprefix("START ERROR: ")


@pytest.mark.parametrize(("method", "text"), [
    ("z = register.add_stage(model, x, y, outputs_count=2)\n    return z[0]",
     "Fail to start workers: The outputs count 2 in register_method not equal to the count 1 defined in model "
     f"(model '{KEY}', stage 1 of method 'predict')"),
    ("z = register.add_stage(model, x, outputs_count=1)\n    return z",
     "Fail to start workers: The inputs count 1 in register_method not equal to the count 2 defined in model "
     f"(model '{KEY}', stage 1 of method 'predict')"),
])
def test_counts_not_the_programs_fail_the_start(servers, tmp_path: Path, method: str, text: str) -> None:
    config = HEADER + f"\n@register.register_method(output_names=['z'])\ndef predict(x, y):\n    {method}\n"
    export(str(tmp_path), "counts", config)
    assert start_error(servers, tmp_path, "counts") == text


def test_one_model_with_two_outputs_counts_fails_the_start(servers, tmp_path: Path) -> None:
    config = HEADER + textwrap.dedent("""
        @register.register_method(output_names=["z"])
        def first(x, y):
            z = register.add_stage(model, x, y, outputs_count=1)
            return z

        @register.register_method(output_names=["z", "w"])
        def second(x, y):
            z, w = register.add_stage(model, x, y, outputs_count=2)
            return z, w
    """)
    export(str(tmp_path), "twice", config)
    assert start_error(servers, tmp_path, "twice") == (
        "Fail to start workers: import twice.servable_config failed, RegisterInputOutputInfo failed, outputs count 2 "
        f"not match old count 1 (model '{KEY}': stage 1 of method 'second' gives 2, stage 1 of method 'first' "
        "gave 1)")


MODULE = """
import torch
from servable_framework.server import register


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


net = register.declare_model("net.safetensors", "SafeTensors", with_batch_dim=True, module_factory=Net)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(net, {args}, outputs_count={outs})
    return {ret}
"""


def _module_servable(root: Path, name: str, args: str, outs: int, ret: str) -> Path:
    (root / name / "1").mkdir(parents=True)
    (root / name / "servable_config.py").write_text(MODULE.format(args=args, outs=outs, ret=ret))
    save_file({"scale": torch.full((3,), 2.0)}, str(root / name / "1" / "net.safetensors"))
    return root


def test_python_module_inputs_count_fails_the_start(servers, tmp_path: Path) -> None:
    _module_servable(tmp_path, "module_inputs", "x, x", 1, "y")
    assert start_error(servers, tmp_path, "module_inputs") == (
        "Fail to start workers: The inputs count 2 in register_method not equal to the count 1 defined in model "
        "(model 'net.safetensors', stage 1 of method 'predict')")


def test_python_module_outputs_count_is_known_at_the_first_call(servers, tmp_path: Path) -> None:
    """The documented limit: a module's outputs count is not known before it runs."""
    _module_servable(tmp_path, "module_outputs", "x", 2, "y[0]")
    _, rest, _ = servers.local(tmp_path, "module_outputs")
    r = rest.post("/model/module_outputs:predict", {"instances": [{"x": [1.0, 2.0, 3.0]}]})
    assert r.status_code == 500
    assert "The outputs count 2 in register_method not equal to the count 1 defined in model (model " \
           "'net.safetensors', stage 1 of method 'predict')" in r.json()["error_msg"]
    rest.close()
