"""The rule for exceptions raised by user Python stages, through the real processes (Main + Worker):
``ValueError`` means bad input (HTTP 400); ``TypeError`` / ``KeyError`` (a bug in the stage) is a server error
(HTTP 500) and goes to the Worker's log with its traceback; the other instances of the request are unaffected."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.procs import REPO

SERVABLES = REPO / "tests" / "support" / "servables"
PREFIX = "Call Function 'stage_rules.check' Failed, method: 'double', stage index(begin with 1): 1, error msg: "


@pytest.fixture(scope="module")
def served(module_servers):
    proc, rest, _ = module_servers.local(SERVABLES, "stage_rules")
    yield proc, rest
    rest.close()


def _one(rest, x: float):
    return rest.post("/model/stage_rules:double", {"instances": [{"x": x}]})


def test_value_error_is_bad_input(served) -> None:
    _, rest = served
    r = _one(rest, -1.0)
    assert r.status_code == 400, r.text
    assert r.json() == {"error_msg": PREFIX + "x must be >= 0, got -1"}


@pytest.mark.parametrize(("x", "kind", "text"), [(0.0, "KeyError", "'missing'"),
                                                 (1.0, "TypeError", "object of type 'float' has no len()")])
def test_other_exceptions_are_server_errors_and_logged(served, x: float, kind: str, text: str) -> None:
    proc, rest = served
    r = _one(rest, x)
    assert r.status_code == 500, r.text
    assert r.json() == {"error_msg": PREFIX + text}
    worker_logs = "".join(p.read_text() for p in (Path(proc.log_path).parent / "serving_logs").glob(
        "log_stage_rules_device0_version*.log"))
    assert f"raised {kind}: a bug in the stage" in worker_logs, "the Worker logs the stage's bug"
    assert _one(rest, 3.0).json() == {"instances": [{"y": 6.0}]}


def test_a_failing_instance_leaves_the_others(served) -> None:
    _, rest = served
    r = rest.post("/model/stage_rules:double", {"instances": [{"x": 2.0}, {"x": 0.0}, {"x": -5.0}, {"x": 4.0}]})
    body = r.json()["instances"]
    assert body[0] == {"y": 4.0} and body[3] == {"y": 8.0}
    assert body[1] == {"error_msg": PREFIX + "'missing'"}
    assert body[2] == {"error_msg": PREFIX + "x must be >= 0, got -5"}
