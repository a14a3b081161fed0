"""Token streaming with the real LLM path: examples/qwen (Main + Distributed Worker + 2 TP Agents running the
generation engine on the tiny Qwen2.5-VL) streamed over SSE and ZMQ, and the Worker's incremental
detokenisation with the real Qwen tokenizer on characters split across tokens."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import pytest

from servable_framework.client import Client
from tests.integration.test_faults import agent_pids, children_of
from tests.integration.test_qwen_servable import start_qwen, tiny_ckpt  # noqa: F401  (fixture)
from tests.integration.test_streaming import SSE, cancelled_running, read_sse
from tests.support.procs import wait_until

FAST_HEARTBEAT = {"SERVABLE_HEARTBEAT_INTERVAL_S": "0.5", "SERVABLE_HEARTBEAT_TIMEOUT_S": "2"}
PROMPT = "Tell me a long story about tensor parallel inference."
N = 64


@pytest.fixture(scope="module")
def qwen(module_servers, tiny_ckpt):  # noqa: F811
    server, agents, rest, zmq_address = start_qwen(module_servers, tiny_ckpt, tp=2, **FAST_HEARTBEAT)
    yield server, agents, rest, zmq_address
    rest.close()


def sse(rest: Any, payload: dict[str, Any]) -> tuple[float, list[tuple[float, str, dict[str, Any]]]]:
    """(request start, [(arrival, event, data)]) of one SSE request."""
    t0 = time.monotonic()
    with rest.client.stream("POST", "/model/qwen:predict", json=payload, headers=SSE) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        return t0, list(read_sse(r))


def test_streamed_pieces_equal_the_plain_answer_and_arrive_early(qwen) -> None:
    _, _, rest, _ = qwen
    payload = {"instances": [{"prompt": PROMPT, "max_new_tokens": N}]}
    t0 = time.monotonic()
    plain = rest.post("/model/qwen:predict", payload)
    plain_s = time.monotonic() - t0
    assert plain.status_code == 200, plain.text
    text = plain.json()["instances"][0]["text"]
    start, events = sse(rest, payload)
    assert all(name == "message" for _, name, _ in events), events
    pieces = [data for _, _, data in events]
    assert "".join(p["text"] for p in pieces) == text
    assert [p["finish_reason"] for p in pieces][-1] == "length"  # the prompt runs all N tokens (seeded model)
    assert all(p["finish_reason"] is None for p in pieces[:-1]) and len(pieces) > N // 4
    first = events[0][0] - start
    assert first < plain_s / 2, f"first event after {first:.3f} s, the plain answer took {plain_s:.3f} s"
    with Client(qwen[3], "qwen", "predict", timeout_s=60) as client:  # the same over ZMQ
        zmq_pieces = list(client.infer_stream({"prompt": PROMPT, "max_new_tokens": np.int32(N)}))
    assert "".join(p["text"] for p in zmq_pieces) == text and zmq_pieces[-1]["finish_reason"] == "length"


def test_batch_of_streams_with_images_and_sampling(qwen) -> None:
    """Several instances stream side by side (rows of one batch); each adds up to its own plain answer."""
    import base64

    from tests.integration.test_qwen_servable import png

    image = {"b64": base64.b64encode(png("blue")).decode()}
    instances = [{"prompt": "What is in the picture?", "image": image, "max_new_tokens": 12},
                 {"prompt": "Hello!", "max_new_tokens": 20, "temperature": 0.8, "top_k": 20, "seed": 3},
                 {"prompt": PROMPT, "max_new_tokens": 5}]
    plain = qwen[2].post("/model/qwen:predict", {"instances": instances})
    assert plain.status_code == 200, plain.text
    rest_texts = [inst["text"] for inst in plain.json()["instances"]]
    _, events = sse(qwen[2], {"instances": instances})
    for i, text in enumerate(rest_texts):
        mine = [data for _, _, data in events if data["index"] == i]
        assert "".join(p["text"] for p in mine) == text
        assert mine[-1]["finish_reason"] in ("length", "eos")


def test_incremental_detokenisation_with_the_qwen_tokenizer(tiny_ckpt) -> None:  # noqa: F811
    """Characters of 2, 3 and 4 bytes split across Qwen byte-level tokens: streamed one token at a time through
    the Worker's diff with the servable's own decode, no piece carries a broken character and the pieces add up."""
    from transformers import AutoTokenizer

    from servable_framework.worker.streaming import OutputDiff, accumulate

    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    text = "héllo wörld, € and 😀 中文! ünïcödé"
    ids = tokenizer.encode(text)
    split = sum(1 for i in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:i]))
    assert split >= 4, "the test needs characters split across tokens"
    diff, so_far, pieces = OutputDiff(), None, []
    for i, token in enumerate(ids):
        so_far = accumulate(so_far, [np.array([token], np.int64)])
        decoded = tokenizer.decode(np.asarray(so_far[0]).tolist(), skip_special_tokens=True)
        piece = diff.delta({"text": decoded}, final=i == len(ids) - 1)
        if piece is not None:
            pieces.append(piece["text"])
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text


def test_disconnect_mid_stream_cancels_the_running_row(qwen) -> None:
    _, _, rest, _ = qwen
    before = cancelled_running(rest)
    with rest.client.stream("POST", "/model/qwen:predict", headers=SSE,
                            json={"instances": [{"prompt": PROMPT, "max_new_tokens": 512}]}) as r:
        assert r.status_code == 200
        assert next(line for line in r.iter_lines() if line.startswith("data: "))
    wait_until(lambda: cancelled_running(rest) >= before + 1, 10, "the running row to be cancelled")
    assert rest.post("/model/qwen:predict", {"instances": [{"prompt": "hi", "max_new_tokens": 2}]}).status_code == 200


def test_agent_killed_mid_decode_of_a_stream(servers, tiny_ckpt) -> None:  # noqa: F811
    server, agents, rest, _ = start_qwen(servers, tiny_ckpt, tp=2, **FAST_HEARTBEAT)
    victim = agent_pids(agents)[1]
    t0 = time.monotonic()
    with rest.client.stream("POST", "/model/qwen:predict", headers=SSE,
                            json={"instances": [{"prompt": PROMPT, "max_new_tokens": 512}]}) as r:
        assert r.status_code == 200
        events = []
        for event in read_sse(r):
            events.append(event)
            if len(events) == 3:
                os.kill(victim, signal.SIGKILL)
    assert time.monotonic() - t0 < 30
    name, data = events[-1][1], events[-1][2]
    assert name == "error" and "rank 1" in data["error_msg"], events[-3:]
    assert all(e[1] == "message" and e[2]["finish_reason"] is None for e in events[:-1])
    wait_until(lambda: rest.is_ready(), 60, "recovery without restarting Main")
    assert rest.post("/model/qwen:predict", {"instances": [{"prompt": "hi", "max_new_tokens": 2}]}).status_code == 200
    tree = [server.pid, *children_of(server.pid), agents.pid, *children_of(agents.pid)]
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    agents.wait(30)
    wait_until(lambda: not any(alive(p) for p in tree), 30, "every process of this cluster to exit")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
