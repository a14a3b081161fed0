"""``Model.call`` inside Python stages (contract §3.2) through the real processes (Main + Worker): a model declared
from two files is two sub-graphs (servable `tests/support/servables/multigraph`); stages call sub-graph 0 and 1,
one instance or several at a time, and every misuse answers the contract's text in the REST error body."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.support.procs import wait_until
from tests.support.servables.multigraph.export_model import export

KEY = "affine.pt2;stats.pt2"


@pytest.fixture(scope="module")
def rest(module_servers, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("multigraph")
    export(str(root))
    _, rest, _ = module_servers.local(root, "multigraph")
    yield rest
    rest.close()


X, Y = [1.0, -2.0, 0.5], [0.25, 4.0, -1.0]


def _expected(x: list[float], y: list[float]) -> tuple[np.ndarray, np.ndarray, float]:
    z = 2 * np.array(x) + np.array(y)
    return z, z + 1, float(z.sum())


def test_add_stage_runs_subgraph_0(rest) -> None:
    r = rest.post("/model/multigraph:affine", {"instances": [{"x": X, "y": Y}]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["instances"][0]["z"], _expected(X, Y)[0], rtol=1e-6)


@pytest.mark.parametrize("method", ["chain", "chain_batched"])
def test_stages_call_both_subgraphs(rest, method: str) -> None:
    """One instance per call (``call(x, y)``: the single output; ``call(z, subgraph=1)``: a tuple), and all the
    instances in one call (``call([[x, y], ...])``: a list of tuples)."""
    rng = np.random.default_rng(7)
    pairs = [(rng.standard_normal(3).round(3).tolist(), rng.standard_normal(3).round(3).tolist()) for _ in range(3)]
    r = rest.post(f"/model/multigraph:{method}", {"instances": [{"x": x, "y": y} for x, y in pairs]})
    assert r.status_code == 200, r.text
    for out, (x, y) in zip(r.json()["instances"], pairs):
        z, shifted, total = _expected(x, y)
        np.testing.assert_allclose(out["z"], z, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["shifted"], shifted, rtol=1e-5, atol=1e-6)
        assert out["total"] == pytest.approx(total, rel=1e-5, abs=1e-5)


def test_each_subgraph_has_its_own_batcher(rest) -> None:
    """Sub-graph 1 runs through its own model queue, named in /metrics."""
    assert rest.post("/model/multigraph:chain", {"instances": [{"x": X, "y": Y}] * 2}).status_code == 200

    def instances(model: str) -> int:
        text = rest.get("/metrics").text
        pattern = rf'^servable_model_instances_total\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} (\S+)'
        return sum(int(float(v)) for v in re.findall(pattern, text, re.M))

    wait_until(lambda: instances(f"{KEY}[subgraph 1]") >= 2, 10, "the sub-graph's batch metrics")
    assert instances(KEY) >= 2


PREFIX = "Call Function 'multigraph._misuse' Failed, method: 'misuse', stage index(begin with 1): 1, error msg: "
CALL = f"Model({KEY}).call() failed: "
CALL1 = f"Model({KEY}, subgraph=1).call() failed: "
CALL2 = f"Model({KEY}, subgraph=2).call() failed: "


@pytest.mark.parametrize(("case", "text"), [
    ("no_inputs", CALL + "no inputs provided"),
    ("format", CALL + "inputs format invalid"),
    ("no_instances", CALL + "Input instances count is 0"),
    ("too_many", CALL + "The inputs count 3 of instance 0 is not equal to the inputs count 2 of the model"),
    ("too_few", CALL + "The inputs count 1 of instance 0 is not equal to the inputs count 2 of the model"),
    ("too_many_batched", CALL + "The inputs count 3 of instance 1 is not equal to the inputs count 2 of the model"),
    ("too_few_batched", CALL + "The inputs count 1 of instance 1 is not equal to the inputs count 2 of the model"),
    ("too_many_subgraph1", CALL1 + "The inputs count 2 of instance 0 is not equal to the inputs count 1 of the "
                                   "model"),
    ("bad_subgraph", CALL2 + "The model does not have subgraph of index 2, the subgraph count of the model is 2"),
    ("size", CALL + "Given model input 0 size 8 not match the size 12 defined in model"),
    ("dtype", CALL + "Given model input 0 data type float64 not match the data type float32 defined in model"),
])
def test_misuse_answers_the_contract_text(rest, case: str, text: str) -> None:
    r = rest.post("/model/multigraph:misuse", {"instances": [{"x": X, "case": case}]})
    assert r.json() == {"error_msg": PREFIX + text}, r.text
    assert r.status_code == 500  # a RuntimeError from a stage: the stage's bug (README, Python stages)


def test_a_misusing_instance_leaves_the_others(rest) -> None:
    r = rest.post("/model/multigraph:misuse", {"instances": [{"x": X, "case": "too_many"}, {"x": X, "case": "size"}]})
    body = r.json()["instances"]
    assert body[0] == {"error_msg": PREFIX + CALL + "The inputs count 3 of instance 0 is not equal to the inputs "
                                                    "count 2 of the model"}
    assert body[1] == {"error_msg": PREFIX + CALL + "Given model input 0 size 8 not match the size 12 defined in "
                                                    "model"}
    r = rest.post("/model/multigraph:chain", {"instances": [{"x": X, "y": Y}]})
    assert r.status_code == 200, "the model still serves after the errors"
