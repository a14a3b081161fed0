"""Graceful drain on SIGTERM, and one servable's failure leaving the others serving."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import numpy as np

from tests.integration.test_faults import DETECT_S, FAST_HEARTBEAT, agent_pids, assert_all_gone, correct, predict
from tests.integration.test_limits import make_slow_dir, sleep_body
from tests.integration.test_matmul_distributed import start_cluster
from tests.support.procs import wait_until


def test_sigterm_drains_in_flight_requests(servers, tmp_path) -> None:
    server, rest, _ = servers.local(make_slow_dir(tmp_path / "svc"), "slow")
    result: dict[str, httpx.Response] = {}

    def slow_request() -> None:
        with httpx.Client(base_url=rest.base, timeout=30) as c:
            result["r"] = c.post("/model/slow:sleep", json=sleep_body(2.0))

    t = threading.Thread(target=slow_request)
    t.start()
    wait_until(lambda: "servable_requests_inflight 1" in rest.get("/metrics").text, 10, "the request in flight")
    server.signal(signal.SIGTERM)
    wait_until(lambda: rest.get("/ready").json().get("draining") is True, 5, "Main to start draining")
    # while draining: new work is refused with the contract's body, the admitted request still completes
    refused = rest.post("/model/slow:sleep", sleep_body(0.0))
    assert refused.status_code == 503 and "shutting down" in refused.json()["error_msg"]
    t.join(30)
    assert result["r"].status_code == 200 and result["r"].json() == {"instances": [{"y": 2.0}]}
    assert server.wait(30) == 0
    assert_all_gone()


def test_other_servables_keep_serving_when_agents_fail(servers, matmul_dir, add_dir) -> None:
    server, agents, rest, _ = start_cluster(servers, matmul_dir(2), 2, also=[str(add_dir), "add"], **FAST_HEARTBEAT)
    rest.wait_ready(server, 120)
    body = {"instances": [{"x1": np.ones((2, 2)).tolist(), "x2": np.ones((2, 2)).tolist()}]}
    os.kill(agent_pids(agents)[0], signal.SIGKILL)
    wait_until(lambda: predict(rest).status_code == 503, DETECT_S, "matmul to fail")
    ready = rest.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["servables"]["add"]["ready"] is True and ready.json()["servables"]["matmul"]["ready"] is False
    r = rest.post("/model/add:add_common", body)
    assert r.json() == {"instances": [{"y": [[2.0, 2.0], [2.0, 2.0]]}]}
    wait_until(lambda: rest.is_ready(), 60, "matmul to recover")
    assert correct(predict(rest))
    rest.close()
