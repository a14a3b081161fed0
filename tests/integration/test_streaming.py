"""Token streaming through every process, for real: Main (REST + ZMQ) + Distributed Worker + 2 TP Agents running
`tests.support.agents:StreamShard` (servable `tests/support/servables/streamer`: it "generates" the UTF-8 bytes of
its input a few per step, streaming them with ``link.stream`` the way the engine does).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from servable_framework.client import Client, StreamError
from tests.conftest import write_rank_table
from tests.integration.test_faults import agent_pids, children_of
from tests.support.procs import REPO, Rest, child_env, free_port, wait_until

SERVABLES = REPO / "tests" / "support" / "servables"
FAST_HEARTBEAT = {"SERVABLE_HEARTBEAT_INTERVAL_S": "0.5", "SERVABLE_HEARTBEAT_TIMEOUT_S": "2"}
MULTIBYTE = "héllo wörld, € and 😀 中文!"  # 1-, 2-, 3- and 4-byte characters: most split across steps
SSE = {"Accept": "text/event-stream"}


def start_streamer(servers, tmp: Path) -> tuple[Any, Any, Rest, str]:
    rest_port, zmq_port, dist_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{dist_port}"
    rank_table = write_rank_table(tmp / "rank_table_2pcs.json", 2)
    env = child_env(**FAST_HEARTBEAT)
    server = servers.start(["-m", "tests.support.serve", "distributed", "--dir", str(SERVABLES), "--name", "streamer",
                            "--rank-table", str(rank_table), "--dist-address", address,
                            "--rest", f"127.0.0.1:{rest_port}", "--zmq", f"127.0.0.1:{zmq_port}"], "server", env=env)
    files = [tmp / f"no_weights{i}" for i in range(2)]  # the shard loads nothing
    for f in files:
        f.touch()
    agents = servers.start(["-m", "tests.support.agents", address, *map(str, files)], "agents", env=env)
    rest = Rest(rest_port)

    def ready() -> bool:
        for proc in (server, agents):
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.log()}")
        return rest.is_ready()

    wait_until(ready, 120, "the streamer servable to be ready")
    return server, agents, rest, f"127.0.0.1:{zmq_port}"


@pytest.fixture(scope="module")
def cluster(module_servers, tmp_path_factory):
    server, agents, rest, zmq_address = start_streamer(module_servers, tmp_path_factory.mktemp("streamer"))
    yield server, agents, rest, zmq_address
    rest.close()


def body(*texts: str, **inputs: Any) -> dict[str, Any]:
    return {"instances": [{"text": t, **inputs} for t in texts]}


def read_sse(response: httpx.Response) -> Iterator[tuple[float, str, dict[str, Any]]]:
    """(arrival time, event name, data) of each event of an SSE response, as it arrives."""
    name = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            yield time.monotonic(), name, json.loads(line[len("data: "):])
            name = "message"


def stream(rest: Rest, path: str, payload: dict[str, Any]) -> tuple[httpx.Response, list[tuple[float, str, dict]]]:
    with rest.client.stream("POST", path, json=payload, headers=SSE) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return r, list(read_sse(r))
        r.read()
        return r, []


def joined(events: list[tuple[float, str, dict]], index: int, name: str = "text") -> Any:
    parts = [d[name] for _, e, d in events if e == "message" and d["index"] == index]
    return "".join(parts) if name == "text" else [v for part in parts for v in part]


def cancelled_running(rest: Rest) -> float:
    for line in rest.get("/metrics").text.splitlines():
        if line.startswith("servable_model_instances_cancelled_total{") and 'when="running"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --------------------------------------------------------------------------------------------- REST


def test_sse_pieces_add_up_to_the_plain_answer(cluster) -> None:
    _, _, rest, _ = cluster
    texts = (MULTIBYTE, "plain", "😀😀😀")
    plain = rest.post("/model/streamer:generate", body(*texts))
    assert plain.status_code == 200, plain.text
    assert plain.json() == rest.post("/model/streamer:generate_plain", body(*texts)).json()
    r, events = stream(rest, "/model/streamer:generate", body(*texts))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    assert {e for _, e, _ in events} == {"message"}, events
    for i, expected in enumerate(plain.json()["instances"]):
        mine = [d for _, _, d in events if d["index"] == i]
        assert all(set(d) == {"index", "text", "tokens", "finish_reason"} for d in mine), mine
        assert [d["finish_reason"] for d in mine] == [None] * (len(mine) - 1) + ["length"]
        assert joined(events, i) == expected["text"] == texts[i]
        assert joined(events, i, "tokens") == expected["tokens"] == list(texts[i].encode())
        assert all("\ufffd" not in d["text"] for d in mine)  # a character split across steps is held back
    assert len([d for _, _, d in events if d["index"] == 0]) > 10  # piece by piece, not all at the end


def test_first_event_arrives_well_before_the_plain_answer(cluster) -> None:
    _, _, rest, _ = cluster
    payload = body("x" * 64, step_ms=20)  # 64 tokens, ~43 steps
    t0 = time.monotonic()
    assert rest.post("/model/streamer:generate", payload).status_code == 200
    plain_s = time.monotonic() - t0
    t0 = time.monotonic()
    r, events = stream(rest, "/model/streamer:generate", payload)
    assert r.status_code == 200 and events
    first, last = events[0][0] - t0, events[-1][0] - t0
    assert first < plain_s / 2, (first, plain_s)
    assert first < last / 2, (first, last)
    assert events[-1][2]["finish_reason"] == "length"


def test_non_stream_method_or_bad_request_is_refused_before_the_stream(cluster) -> None:
    _, _, rest, _ = cluster
    r, events = stream(rest, "/model/streamer:generate_plain", body("abc"))
    assert r.status_code == 400 and not events
    assert r.json() == {"error_msg": "Request servable(streamer) method(generate_plain), the method does not "
                                     "support streaming: declare it with register_method(..., stream=True)"}
    r, _ = stream(rest, "/model/streamer:generate", {"instances": [{"step_ms": 1}]})  # no text
    assert r.status_code == 400 and "Cannot find input text" in r.json()["error_msg"], r.text
    r, _ = stream(rest, "/model/streamer:generate", body(""))  # an empty instance: no output, still one event
    assert r.status_code == 200
    r, _ = stream(rest, "/model/nothere:generate", body("abc"))
    assert r.status_code == 404, r.text
    r, _ = stream(rest, "/model/streamer:generate", {"instances": [{"text": [1, 2]}]})  # fails in preprocess
    assert r.status_code == 400 and "'text' must be a string" in r.json()["error_msg"], r.text
    # one instance fails in preprocess, the other streams: its error is an event of the stream
    r, events = stream(rest, "/model/streamer:generate", {"instances": [{"text": 5}, {"text": "ok"}]})
    assert r.status_code == 200
    errors = [d for _, e, d in events if e == "error"]
    assert len(errors) == 1 and errors[0]["index"] == 0 and "'text' must be a string" in errors[0]["error_msg"]
    assert joined(events, 1) == "ok"


def test_error_event_when_the_shard_fails_midway(cluster) -> None:
    _, _, rest, _ = cluster
    r, events = stream(rest, "/model/streamer:generate", body(MULTIBYTE, fail_at=8, step_ms=10))
    assert r.status_code == 200
    assert [e for _, e, _ in events[:-1]] == ["message"] * (len(events) - 1) and len(events) > 2
    name, data = events[-1][1:]
    assert name == "error" and set(data) == {"index", "error_msg"}, events[-1]
    assert "rank 0" in data["error_msg"] and "injected failure" in data["error_msg"], data
    assert MULTIBYTE.startswith(joined(events, 0))
    plain = rest.post("/model/streamer:generate", body("still works"))  # the servable keeps serving
    assert plain.status_code == 200 and plain.json()["instances"][0]["text"] == "still works"


def test_client_hanging_up_mid_stream_cancels_its_rows(cluster) -> None:
    _, _, rest, _ = cluster
    before = cancelled_running(rest)
    payload = body("y" * 400, step_ms=20)  # ~5 s if it ran to the end
    t0 = time.monotonic()
    with httpx.Client(base_url=rest.base, timeout=30) as client, \
            client.stream("POST", "/model/streamer:generate", json=payload, headers=SSE) as r:
        assert r.status_code == 200
        assert next(line for line in r.iter_lines() if line.startswith("data: "))
    # the client and its connection are closed: Main cancels the request, the output rank stops the row
    wait_until(lambda: cancelled_running(rest) >= before + 1, 10, "the running row to be cancelled")
    assert time.monotonic() - t0 < 5
    assert rest.post("/model/streamer:generate", body("next")).json()["instances"][0]["text"] == "next"


# --------------------------------------------------------------------------------------------- ZMQ


def test_client_infer_stream(cluster) -> None:
    _, _, rest, zmq_address = cluster
    with Client(zmq_address, "streamer", "generate", timeout_s=30) as client:
        pieces: list[dict[str, Any]] = []
        with pytest.raises(StreamError, match="'text' must be a string") as info:  # instance 1: bad input
            for piece in client.infer_stream([{"text": MULTIBYTE}, {"text": 7}]):
                pieces.append(piece)
        assert list(info.value.errors) == [1]
        plain = client.infer({"text": MULTIBYTE})
        assert isinstance(plain, list)
        mine = [p for p in pieces if p["index"] == 0]
        assert "".join(p["text"] for p in mine) == plain[0]["text"] == MULTIBYTE
        np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in mine]), plain[0]["tokens"])
        assert [p["finish_reason"] for p in mine] == [None] * (len(mine) - 1) + ["length"]
        assert len(mine) > 10 and all("\ufffd" not in p["text"] for p in mine)
        assert all(p["index"] == 0 for p in pieces)  # instance 0 streamed to the end

        pieces = []
        with pytest.raises(StreamError, match="rank 0.*injected failure"):
            for piece in client.infer_stream({"text": "abcdefgh", "fail_at": 4, "step_ms": 10}):
                pieces.append(piece)
        assert pieces and "abcdefgh".startswith("".join(p["text"] for p in pieces))

        # leaving the loop early cancels the request on the server
        before = cancelled_running(rest)
        for piece in client.infer_stream({"text": "z" * 400, "step_ms": 20}):
            assert piece["index"] == 0
            break
        wait_until(lambda: cancelled_running(rest) >= before + 1, 10, "the abandoned row to be cancelled")

    with Client(zmq_address, "streamer", "generate_plain") as client, \
            pytest.raises(StreamError, match="does not support streaming"):
        next(client.infer_stream({"text": "abc"}))


# --------------------------------------------------------------------------------------------- faults


def test_agent_killed_mid_stream(servers, tmp_path) -> None:
    """Kill an Agent while a stream runs: the stream ends with an error event naming the rank, the servable
    is available again without restarting Main, and stopping Main leaves no process behind."""
    server, agents, rest, _ = start_streamer(servers, tmp_path)
    victim = agent_pids(agents)[1]
    events: list[tuple[float, str, dict]] = []
    with rest.client.stream("POST", "/model/streamer:generate", json=body("k" * 400, step_ms=20),
                            headers=SSE) as r:
        assert r.status_code == 200
        for event in read_sse(r):
            events.append(event)
            if len(events) == 3:
                os.kill(victim, signal.SIGKILL)
    name, data = events[-1][1:]
    assert name == "error" and "rank 1" in data["error_msg"], events[-3:]
    assert "servable is not available" in data["error_msg"], data
    wait_until(lambda: rest.is_ready(), 60, "recovery")
    r, events = stream(rest, "/model/streamer:generate", body(MULTIBYTE))
    assert r.status_code == 200 and joined(events, 0) == MULTIBYTE
    rest.close()
    ours = descendants(server.pid) + descendants(agents.pid)
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    agents.wait(30)
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in ours), 30, "every process of the servable to exit")


def descendants(pid: int) -> list[int]:
    out = children_of(pid)
    for child in list(out):
        out += descendants(child)
    return out

