"""Declaration API and loader (contract §2-3): servable_config.py files written to tmp dirs and imported."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from servable_framework.servable.loader import load_servable, newest_version, resolve_version
from servable_framework.servable.spec import TensorDef
from servable_framework.worker.pipeline import MethodRunner

HEADER = "import numpy as np\nfrom servable_framework.server import register, distributed\n"


def make(tmp_path: Path, body: str, name: str = "svc") -> Path:
    (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / name / "servable_config.py").write_text(HEADER + textwrap.dedent(body))
    return tmp_path


def load_error(tmp_path: Path, body: str) -> str:
    with pytest.raises(RuntimeError) as info:
        load_servable(str(make(tmp_path, body)), "svc")
    return str(info.value)


def test_traces_stages_and_outputs(tmp_path: Path) -> None:
    loaded = load_servable(str(make(tmp_path, """
        m = register.declare_model("a.pt2", "torchexport")
        def pre(a, b):
            return a, b
        @register.register_method(output_names=["y", "b2"])
        def run(a, b):
            x, y = register.add_stage(pre, a, b, outputs_count=2)
            z = register.add_stage(m, x, y, outputs_count=1)
            return z, y
    """)), "svc")
    method = loaded.spec.methods["run"]
    assert method.input_names == ["a", "b"]
    assert [s.outputs_count for s in method.stages] == [2, 1]
    assert method.stages[1].inputs == [TensorDef(1, 0), TensorDef(1, 1)]
    assert method.returns == [TensorDef(2, 0), TensorDef(1, 1)]
    assert loaded.spec.models[0].model_format == "TorchExport"
    assert loaded.spec.models[0].inputs_count == 2


@pytest.mark.parametrize(("body", "fragment"), [
    ("m = register.declare_model('a.pt2', 'onnx')", "model format can only be TorchExport or SafeTensors"),
    ("m = register.declare_model(3, 'TorchExport')", "Parameter 'model_file' should be str or tuple/list of str"),
    ("m = register.declare_model(['a', 'a'], 'TorchExport')", "The item value 'a' in parameter 'model_file' should "
                                                               "not be repeated"),
    ("m = register.declare_model('', 'TorchExport')", "Parameter 'model_file' should not be empty str"),
    ("m = register.declare_model('a.pt2', 'TorchExport', with_batch_dim=1)",
     "Parameter 'with_batch_dim' should be bool, but actually <class 'int'>"),
    ("m = register.declare_model('a.pt2', 'TorchExport')\nm2 = register.declare_model('a.pt2', 'TorchExport')",
     "the same model has already been declared"),
    ("m = register.declare_model(['a.pt2', 'b.pt2'], 'TorchExport')\nm2 = register.declare_model('b.pt2', "
     "'TorchExport')", "model file 'b.pt2' has already been used"),
    ("m = distributed.declare_servable(2, 1, shard='matmul')\nm2 = register.declare_model('b.pt2', 'TorchExport')",
     "servable has already been declared as distributed servable"),
    ("m = register.declare_model('b.pt2', 'TorchExport')\nm2 = distributed.declare_servable(2, 1, shard='x')",
     "servable has already been declared as local servable"),
    ("m = distributed.declare_servable(2, 1, shard='x')\nm2 = distributed.declare_servable(2, 1, shard='x')",
     "servable is repeatedly been declared as distributed servable"),
    ("m = distributed.declare_servable(3, 2, shard='x')", "Rank size must be an integral multiple of stage size"),
    ("m = distributed.declare_servable(0, 1, shard='x')", "Parameter 'rank_size' should be >= 1"),
    ("m = distributed.declare_servable(True, 1, shard='x')", "Parameter 'rank_size' should be int"),
])
def test_declaration_errors(tmp_path: Path, body: str, fragment: str) -> None:
    assert fragment in load_error(tmp_path, body + "\n@register.register_method('y')\ndef f(x):\n    return x\n")


@pytest.mark.parametrize(("method", "fragment"), [
    ("def f(*xs):\n    return xs[0]", "'f' input xs cannot be VAR_POSITIONAL !"),
    ("def f(x, **kw):\n    return x", "'f' input kw cannot be VAR_KEYWORD !"),
    ("def f(x, *, y):\n    return x", "'f' input y cannot be KEYWORD_ONLY !"),
    ("def f(x):\n    return 1", "Each value returned is a placeholder for data"),
    ("def f(x):\n    return x, x", "Method return output size 2 not match registered 1"),
    ("def f(x):\n    return register.add_stage(len, x, outputs_count=1)",
     "the parameter 'stage' of add_stage must be function or Model returned by declare_model"),
    ("def f(x):\n    return register.add_stage(g, 1, outputs_count=1)",
     "Each value of parameter *args is a placeholder for data"),
    ("def f(x):\n    return register.add_stage(g, x, x, outputs_count=1)",
     "function svc.g input args count 1 not match the count 2 registered in method"),
    ("def f(x):\n    return register.add_stage(g, x, outputs_count=1, batch_size=-1)",
     "Parameter 'batch_size' should be >= 0"),
    ("def f(x):\n    a, b = register.add_stage(g, x, outputs_count=1)\n    return a",
     "cannot unpack non-iterable TensorDef object"),
    ("def f(x):\n    a, b = register.add_stage(g, x, outputs_count=3)\n    return a",
     "too many values to unpack (expected 2)"),
])
def test_method_errors(tmp_path: Path, method: str, fragment: str) -> None:
    body = f"def g(a):\n    return a\n@register.register_method(output_names='y')\n{method}\n"
    assert fragment in load_error(tmp_path, body)


def test_cross_method_consistency(tmp_path: Path) -> None:
    body = """
        def g(a, b=None):
            return a
        @register.register_method('y')
        def f1(x):
            return register.add_stage(g, x, outputs_count=1, batch_size=2)
        @register.register_method('y')
        def f2(x):
            return register.add_stage(g, x, outputs_count=1)
    """
    assert "parameter 'batch_size' in multiple 'add_stage' should be enabled or disabled consistently" in \
        load_error(tmp_path, body)
    body2 = """
        def g(a):
            return a
        @register.register_method('y')
        def f1(x):
            return register.add_stage(g, x, outputs_count=1)
        @register.register_method('y')
        def f1(x):
            return x
    """
    assert "Method f1 has been registered more than once." in load_error(tmp_path, body2)


def test_outside_servable_config() -> None:
    from servable_framework.server import register

    with pytest.raises(RuntimeError, match="Failed to obtain the directory of servable_config.py"):
        register.declare_model("a.pt2", "TorchExport")


def test_no_method_and_import_error(tmp_path: Path) -> None:
    assert "There is no method registered for servable" in load_error(tmp_path, "x = 1\n")
    assert "import svc.servable_config failed" in load_error(tmp_path, "raise ValueError('boom')\n")


def test_versions(tmp_path: Path) -> None:
    make(tmp_path, "")
    assert newest_version(str(tmp_path), "svc") == 0
    for v in ("0", "1", "12", "3", "x7"):
        (tmp_path / "svc" / v).mkdir()
    assert newest_version(str(tmp_path), "svc") == 12
    assert resolve_version(str(tmp_path), "svc", 0, has_models=True) == 12
    assert resolve_version(str(tmp_path), "svc", 3, has_models=True) == 3
    with pytest.raises(RuntimeError, match="There is no specified version directory of models, specified version "
                                           "number: 5"):
        resolve_version(str(tmp_path), "svc", 5, has_models=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="There is no valid version directory of models"):
        resolve_version(str(tmp_path), "empty", 0, has_models=True)
    assert resolve_version(str(tmp_path), "empty", 0, has_models=False) == 1


def test_pipeline_python_stages(tmp_path: Path) -> None:
    """Function-only methods run without any model: per-instance errors, batched stages, optional inputs."""
    loaded = load_servable(str(make(tmp_path, """
        def scale(x, k):
            if float(x.sum()) < 0:
                raise ValueError("negative input")
            return x * k
        def total(batch):
            for (x,) in batch:
                yield float(x.sum())
        @register.register_method(output_names=["y", "s"])
        def run(x, k=2):
            y = register.add_stage(scale, x, k, outputs_count=1)
            s = register.add_stage(total, y, outputs_count=1, batch_size=0)
            return y, s
    """)), "svc")
    runner = MethodRunner(loaded.spec, {})
    results = runner.run("run", [{"x": np.array([1.0, 2.0])}, {"x": np.array([-5.0])},
                                 {"x": np.array([3.0]), "k": np.array(10.0)}])
    np.testing.assert_array_equal(results[0]["y"], [2.0, 4.0])
    assert results[0]["s"].dtype == np.float64 and float(results[0]["s"]) == 6.0
    assert "Call Function 'svc.scale' Failed, method: 'run', stage index(begin with 1): 1, error msg: negative " \
           "input" in results[1].message
    assert results[1].http_status == 400
    assert float(results[2]["s"]) == 30.0


LEGACY = """
    m = register.declare_model("a.pt2", "torchexport")
    def pre(a, b):
        return a + b, a - b
    def post(y):
        return y * 2
"""


def test_legacy_call_api_traces_like_add_stage(tmp_path: Path) -> None:
    """MindSpore 1.x configs: call_preprocess / call_servable / call_postprocess, outputs counts from the source."""
    loaded = load_servable(str(make(tmp_path, LEGACY + """
    @register.register_method(output_names=["y"])
    def predict(a, b):
        "a docstring is allowed"
        x1, x2 = register.call_preprocess(pre, a, b)
        y = register.call_servable(x1, x2)
        y = register.call_postprocess_pipeline(post, y)
        return y
    """)), "svc")
    stages = loaded.spec.methods["predict"].stages
    assert [s.outputs_count for s in stages] == [2, 1, 1]
    assert stages[1].model is loaded.spec.models[0] and stages[1].inputs == [TensorDef(1, 0), TensorDef(1, 1)]
    assert [s.tag for s in (stages[0], stages[2])] == ["Preprocess", "Postprocess"]
    assert stages[0].batch_size is None and stages[2].batch_size == 0
    assert loaded.spec.methods["predict"].returns == [TensorDef(3, 0)]


@pytest.mark.parametrize(("method", "fragment"), [
    ("y = register.call_servable(a, b)\n        y = register.call_servable(y, b)\n        return y",
     "call_servable should not be invoked more than once"),
    ("y = register.call_servable(a, b)\n        x1, x2 = register.call_preprocess(pre, a, b)\n        return y",
     "call_servable should be invoked after call_preprocess"),
    ("y = register.call_postprocess(post, a)\n        z = register.call_servable(y, b)\n        return z",
     "call_postprocess or call_postprocess_pipeline should be invoked after call_servable"),
    ("x1, x2 = register.call_preprocess(pre, a, b)\n        return x1",
     "Not find the invoke of 'call_servable'"),
    ("if True:\n            y = register.call_servable(a, b)\n        return y",
     "complex statements such as conditions and loops are not supported in register_method when the interface "
     "'call_servable' is used, use 'add_stage' to replace 'call_servable'"),
])
def test_legacy_call_api_rules(tmp_path: Path, method: str, fragment: str) -> None:
    body = LEGACY + f"""
    @register.register_method(output_names=["y"])
    def predict(a, b):
        {method}
    """
    assert fragment in load_error(tmp_path, body)


def test_legacy_call_servable_needs_exactly_one_model(tmp_path: Path) -> None:
    method = """
    @register.register_method(output_names=["y"])
    def predict(a):
        y = register.call_servable(a)
        return y
    """
    assert "There is no model declared" in load_error(tmp_path, method)
    two = 'm = register.declare_model("a.pt2", "torchexport")\nm2 = register.declare_model("b.pt2", "torchexport")\n'
    (tmp_path / "two").mkdir()
    assert "more than one servable declared" in load_error(tmp_path / "two", two + textwrap.dedent(method))


MULTI = """
    m = register.declare_model(["a.pt2", "b.pt2"], "TorchExport")
    @register.register_method(output_names=["z"])
    def run(x, y):
        return register.add_stage(m, x, y, outputs_count=1)
"""


def _multi(tmp_path: Path):
    loaded = load_servable(str(make(tmp_path, MULTI)), "svc")
    return loaded.spec.models[0], loaded.handles[0]


def _call_error(handle, *args, **kw) -> str:
    with pytest.raises(RuntimeError) as info:
        handle.call(*args, **kw)
    return str(info.value)


def test_a_list_of_files_is_one_model_with_subgraphs(tmp_path: Path) -> None:
    spec, handle = _multi(tmp_path)
    assert spec.key == "a.pt2;b.pt2" and spec.files == ["a.pt2", "b.pt2"] and spec.subgraph_count == 2
    assert (spec.inputs_count, spec.outputs_count, spec.registered_by) == (2, 1, "stage 1 of method 'run'")
    # nothing is loaded outside a Worker: the argument checks come first, then "not declared"
    key = "Model(a.pt2;b.pt2).call() failed: "
    assert _call_error(handle) == key + "no inputs provided"
    assert _call_error(handle, [1, 2]) == key + "inputs format invalid"
    assert _call_error(handle, []) == key + "Input instances count is 0"
    assert _call_error(handle, 1, subgraph=2) == "Model(a.pt2;b.pt2, subgraph=2).call() failed: The model does " \
                                                 "not have subgraph of index 2, the subgraph count of the model is 2"
    assert "subgraph count of the model is 2" in _call_error(handle, 1, subgraph=-1)
    assert _call_error(handle, 1, subgraph=True) == "Parameter 'subgraph' should be int, but actually <class 'bool'>"
    assert _call_error(handle, 1, 2) == key + "the model is not declared"


def test_model_call_runs_the_subgraph_it_names(tmp_path: Path) -> None:
    from servable_framework.servable.declare import GraphRunner

    _, handle = _multi(tmp_path)
    calls: list[tuple[int, list[list[int]]]] = []

    def graph(n: int, outputs: int) -> GraphRunner:
        def run(instances: list[list[int]]) -> list[list[int]]:
            calls.append((n, instances))
            return [[sum(inst) * (k + 1) for k in range(outputs)] for inst in instances]
        return GraphRunner(inputs_count=2 if n == 0 else 1, run=run)

    with pytest.raises(RuntimeError, match="2 sub-graphs, 1 bound"):
        handle.bind([graph(0, 1)])
    handle.bind([graph(0, 1), graph(1, 2)])
    assert handle.call(1, 2) == 3  # one output: the value
    assert handle.call(5, subgraph=1) == (5, 10)  # several: a tuple
    assert handle.call([[1, 2], [3, 4]]) == [(3,), (7,)]  # several instances: a tuple each
    assert handle.call([(5,), [6]], subgraph=1) == [(5, 10), (6, 12)]
    assert calls == [(0, [[1, 2]]), (1, [[5]]), (0, [[1, 2], [3, 4]]), (1, [[5], [6]])]
    key, key1 = "Model(a.pt2;b.pt2).call() failed: ", "Model(a.pt2;b.pt2, subgraph=1).call() failed: "
    assert _call_error(handle, 1, 2, 3) == key + "The inputs count 3 of instance 0 is not equal to the inputs " \
                                                 "count 2 of the model"
    assert _call_error(handle, [[1, 2], [3]]) == key + "The inputs count 1 of instance 1 is not equal to the " \
                                                       "inputs count 2 of the model"
    assert _call_error(handle, 1, 2, subgraph=1) == key1 + "The inputs count 2 of instance 0 is not equal to the " \
                                                           "inputs count 1 of the model"
    assert len(calls) == 4, "a rejected call runs nothing"


def test_model_used_with_other_counts_names_both_stages(tmp_path: Path) -> None:
    body = """
        m = register.declare_model("a.pt2", "TorchExport")
        @register.register_method(output_names=["z"])
        def first(x):
            return register.add_stage(m, x, outputs_count=1)
        @register.register_method(output_names=["z"])
        def second(x, y):
            return register.add_stage(m, x, y, outputs_count=1)
    """
    assert load_error(tmp_path, body) == (
        "import svc.servable_config failed, RegisterInputOutputInfo failed, inputs count 2 not match old count 1 "
        "(model 'a.pt2': stage 1 of method 'second' gives 2, stage 1 of method 'first' gave 1)")


def test_loaded_model_counts_checked_against_add_stage(tmp_path: Path) -> None:
    """What the Worker does at start (no process here): a program's inputs and outputs counts, a Python module's
    inputs count when its forward has a fixed arity."""
    import torch

    from servable_framework.servable.spec import ModelSpec
    from servable_framework.worker.local_model import LocalModel
    from tests.support.servables.multigraph.export_model import export_programs

    export_programs(str(tmp_path / "1"))

    def spec(inputs: int | None, outputs: int | None, files: list[str], fmt: str = "TorchExport",
             factory=None) -> ModelSpec:
        return ModelSpec(key=";".join(files), files=files, model_format=fmt, with_batch_dim=True,
                         without_batch_dim_inputs=(), max_batch_size=0, max_batch_delay_ms=0.0,
                         module_factory=factory, inputs_count=inputs, outputs_count=outputs,
                         registered_by="stage 2 of method 'm'")

    cpu = torch.device("cpu")
    files = ["affine.pt2", "stats.pt2"]
    ok = [LocalModel(spec(2, 1, files), str(tmp_path / "1"), cpu, n) for n in (0, 1)]
    assert [(m.inputs_count, m.outputs_count) for m in ok] == [(2, 1), (1, 2)]
    with pytest.raises(RuntimeError) as info:
        LocalModel(spec(2, 2, files), str(tmp_path / "1"), cpu)
    assert str(info.value) == ("The outputs count 2 in register_method not equal to the count 1 defined in model "
                               "(model 'affine.pt2;stats.pt2', stage 2 of method 'm')")
    with pytest.raises(RuntimeError, match="The inputs count 1 in register_method not equal to the count 2 defined"):
        LocalModel(spec(1, 1, files), str(tmp_path / "1"), cpu)
    LocalModel(spec(2, 2, files), str(tmp_path / "1"), cpu, 1)  # the add_stage counts are sub-graph 0's only

    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x * self.w + y

    class Loose(Net):
        def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
            return x * self.w

    save_file({"w": torch.ones(3)}, str(tmp_path / "1" / "net.safetensors"))
    module = LocalModel(spec(2, 5, ["net.safetensors"], "SafeTensors", Net), str(tmp_path / "1"), cpu)
    assert (module.inputs_count, module.outputs_count) == (2, None)  # outputs: known when it runs
    with pytest.raises(RuntimeError, match="The inputs count 3 in register_method not equal to the count 2"):
        LocalModel(spec(3, 1, ["net.safetensors"], "SafeTensors", Net), str(tmp_path / "1"), cpu)
    loose = LocalModel(spec(3, 1, ["net.safetensors"], "SafeTensors", Loose), str(tmp_path / "1"), cpu)
    assert loose.inputs_count is None  # a default: the arity is not fixed, nothing to compare
