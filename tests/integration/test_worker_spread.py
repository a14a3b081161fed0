"""One request's instances spread over the Workers of its servable (contract §5.1 ``num_parallel_workers``),
through real processes.

`spread_scale` (`tests/support/servables`): a batched model ``y = 2x`` (batch size 2) and a Python stage that
answers the Worker's pid per instance. Started once with two device Workers and once with one device Worker
plus one extra worker (``num_parallel_workers=2``): a request of 8 instances is cut into whole batches over
both Workers, the answers come back in instance order, per-instance errors stay per instance, and each
Worker's share shows in ``/metrics`` (``servable_worker_instances_total`` counted by Main,
``servable_model_instances_total`` reported by the Worker itself). The extra worker loads the model too, so
``Model.call`` inside a stage runs there as well.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.integration.test_failover import copy_servable, start_main, worker_pids
from tests.support.procs import Rest


@pytest.fixture
def scale_dir(tmp_path: Path) -> Path:
    root = copy_servable(tmp_path, "spread_scale")
    (root / "spread_scale" / "1").mkdir()
    save_file({"weight": torch.tensor([2.0])}, str(root / "spread_scale" / "1" / "scale.safetensors"))
    return root


def per_worker(rest: Rest, metric: str) -> dict[str, float]:
    """``{worker id: value}`` of a ``{servable="spread_scale", ..., worker=...}`` counter in ``/metrics``."""
    out: dict[str, float] = {}
    for labels, value in re.findall(rf"^{metric}\{{([^}}]*)\}} (\S+)$", rest.get("/metrics").text, re.M):
        if 'servable="spread_scale"' in labels:
            worker = re.search(r'worker="([^"]+)"', labels)
            assert worker is not None
            out[worker.group(1)] = out.get(worker.group(1), 0.0) + float(value)
    return out


def xs(count: int) -> list[list[float]]:
    return [[float(i), i + 1.0, i + 2.0] for i in range(count)]


@pytest.mark.parametrize(("devices", "parallel"), [([0, 1], 0), ([0], 2)], ids=["two-devices", "device+extra"])
def test_one_request_spreads_over_the_workers(servers, scale_dir, devices, parallel) -> None:
    server, rest = start_main(servers, scale_dir, "spread_scale", devices, parallel)
    pids = worker_pids(server)
    assert len(pids) == 2
    before = per_worker(rest, "servable_worker_instances_total")

    # 8 instances, batch size 2: 4 batches, 2 on each Worker, in instance order
    values = xs(8)
    r = rest.post("/model/spread_scale:predict", {"instances": [{"x": x} for x in values]})
    assert r.status_code == 200, r.text
    out = r.json()["instances"]
    assert [o["y"] for o in out] == [[2 * v for v in x] for x in values]
    owners = [o["pid"] for o in out]
    assert set(owners) == set(pids), f"not spread over both Workers: {owners}"
    assert owners[:4] == [owners[0]] * 4 and owners[4:] == [owners[4]] * 4, owners  # whole batches, in order

    # each Worker's share is visible: Main's count per Worker, and the model instances each Worker reports
    after = per_worker(rest, "servable_worker_instances_total")
    shares = {w: after[w] - before.get(w, 0.0) for w in after}
    assert sorted(shares.values()) == [4.0, 4.0], shares
    model = per_worker(rest, "servable_model_instances_total")
    assert len(model) == 2 and all(v >= 4 for v in model.values()), model

    # a per-instance error stays on its instance; the others are answered, in order, by both Workers
    bad = xs(8)
    bad[5] = [-1.0, 0.0, 0.0]
    r = rest.post("/model/spread_scale:predict", {"instances": [{"x": x} for x in bad]})
    assert r.status_code == 200, r.text
    out = r.json()["instances"]
    assert "x must not be negative" in out[5]["error_msg"] and set(out[5]) == {"error_msg"}
    assert [o["y"] for i, o in enumerate(out) if i != 5] == [[2 * v for v in x] for i, x in enumerate(bad) if i != 5]
    assert {o["pid"] for o in out if "pid" in o} == set(pids)

    # an odd count: whole batches first (2 + 1 batches, the partial one last)
    r = rest.post("/model/spread_scale:predict", {"instances": [{"x": x} for x in xs(5)]})
    owners = [o["pid"] for o in r.json()["instances"]]
    assert owners[:4] == [owners[0]] * 4 and owners[4] != owners[0], owners

    # Model.call inside a stage runs on every Worker, the extra worker included (it loads the model itself)
    values = xs(6)
    r = rest.post("/model/spread_scale:via_call", {"instances": [{"x": x} for x in values]})
    assert r.status_code == 200, r.text
    out = r.json()["instances"]
    np.testing.assert_allclose([o["y"] for o in out], 2 * np.array(values))
    assert {o["pid"] for o in out} == set(pids)

    # one instance runs on one Worker, as before
    r = rest.post("/model/spread_scale:predict", {"instances": [{"x": [1.0, 2.0, 3.0]}]})
    assert r.json()["instances"][0]["y"] == [2.0, 4.0, 6.0]
