"""``/metrics`` for real (prometheus_client's exposition, parsed with its parser): per servable and protocol
request latency, time to first token and between pieces of streaming requests, generated tokens (the
streamer servable's ``tokens`` output: one id per byte of its text), request outcomes; and every metric from
before still there with its type and labels. Main + Distributed Worker + 2 Agents of `tests/support/servables/
streamer` (as in test_streaming.py), over REST and ZMQ.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from servable_framework.client import Client
from servable_framework.main.metrics import LATENCY_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS
from tests.integration.test_streaming import body, start_streamer, stream
from tests.support.procs import Rest, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
LABELS = {"servable": "streamer"}


@pytest.fixture(scope="module")
def cluster(module_servers, tmp_path_factory):
    server, agents, rest, zmq_address = start_streamer(module_servers, tmp_path_factory.mktemp("metrics"))
    yield server, agents, rest, zmq_address
    rest.close()


def scrape(rest: Rest) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, sorted labels) -> value) of one GET /metrics."""
    r = rest.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({**LABELS, **labels}.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def buckets(samples: Samples, name: str, **labels: str) -> list[float]:
    want = {**LABELS, **labels}
    return sorted(float(dict(key)["le"]) for (sample, key) in samples
                  if sample == f"{name}_bucket" and {k: v for k, v in key if k != "le"} == want)


def token_pieces(events: list[tuple[float, str, dict[str, Any]]], index: int) -> int:
    """The pieces of instance ``index`` that carried output (what the server times)."""
    return sum(1 for _, e, d in events if e == "message" and d["index"] == index and (d["text"] or d["tokens"]))


def test_llm_metrics_per_servable_and_protocol(cluster) -> None:
    _, _, rest, zmq_address = cluster
    _, before = scrape(rest)
    texts = ("héllo wörld", "abcdefgh")

    # REST: one plain request, one streaming request of two instances (two sequences)
    r = rest.post("/model/streamer:generate_plain", body("plain text"))
    assert r.status_code == 200, r.text
    r, events = stream(rest, "/model/streamer:generate", body(*texts, step_ms=10))
    assert r.status_code == 200 and events, r.text
    rest_pieces = [token_pieces(events, i) for i in range(2)]
    assert min(rest_pieces) >= 1 and sum(rest_pieces) > 2  # pieces as they come (a few bytes a step)
    # ZMQ: the same, one instance each
    with Client(zmq_address, "streamer", "generate_plain", timeout_s=30) as client:
        assert isinstance(client.infer({"text": "zmq!"}), list)
    with Client(zmq_address, "streamer", "generate", timeout_s=30) as client:
        pieces = list(client.infer_stream({"text": "zmq stream", "step_ms": 10}))
    zmq_pieces = sum(1 for p in pieces if p["text"] or len(p["tokens"]))
    # refused before any Worker (no servable label), and one that times out in the Worker (outcome error)
    assert rest.post("/model/nothere:generate", body("x")).status_code == 404
    slow = rest.post("/model/streamer:generate_plain", body("y" * 200, step_ms=50),
                     headers={"X-Request-Timeout-S": "0.3"})
    assert slow.status_code == 504, slow.text
    # refused bodies: not a request at all when it does not parse (an empty instances array does not either);
    # refused instances (an input missing) count as a request with no servable metrics (the Worker parses and
    # checks them: Main forwards the body unparsed, and counts as if it had done that itself)
    assert rest.post("/model/streamer:generate_plain", b'{"instances": [').status_code == 400
    assert rest.post("/model/streamer:generate_plain", {"instances": []}).status_code == 400
    missing = rest.post("/model/streamer:generate_plain", {"instances": [{"txt": "x"}]})
    assert missing.status_code == 400 and "Cannot find input text" in missing.json()["error_msg"], missing.text

    types, after = scrape(rest)
    for name in ("servable_request_latency_seconds", "servable_time_to_first_token_seconds",
                 "servable_time_per_output_token_seconds"):
        assert types[name] == "histogram"
    for name in ("servable_prompt_tokens", "servable_generation_tokens", "servable_requests_finished"):
        assert types[name] == "counter"

    # latency: requests that succeeded, per protocol; vLLM's edges (and ours below 0.3 s)
    assert delta(before, after, "servable_request_latency_seconds_count", protocol="rest") == 2
    assert delta(before, after, "servable_request_latency_seconds_count", protocol="zmq") == 2
    assert buckets(after, "servable_request_latency_seconds", protocol="rest") == [*LATENCY_BUCKETS, math.inf]
    assert value(after, "servable_request_latency_seconds_bucket", protocol="rest", le="+Inf") == \
        value(after, "servable_request_latency_seconds_count", protocol="rest")
    # time to first token: once per streamed instance; time per output token: between its pieces
    assert delta(before, after, "servable_time_to_first_token_seconds_count", protocol="rest") == 2
    assert delta(before, after, "servable_time_to_first_token_seconds_count", protocol="zmq") == 1
    assert delta(before, after, "servable_time_per_output_token_seconds_count", protocol="rest") == \
        sum(rest_pieces) - 2
    assert delta(before, after, "servable_time_per_output_token_seconds_count", protocol="zmq") == zmq_pieces - 1
    assert buckets(after, "servable_time_to_first_token_seconds", protocol="rest") == [*TTFT_BUCKETS, math.inf]
    assert buckets(after, "servable_time_per_output_token_seconds", protocol="zmq") == [*TPOT_BUCKETS, math.inf]
    ttft = delta(before, after, "servable_time_to_first_token_seconds_sum", protocol="rest")
    total = delta(before, after, "servable_request_latency_seconds_sum", protocol="rest")
    assert 0 < ttft / 2 < total  # a first token comes before the answers end
    # generated tokens: one id per UTF-8 byte, plain and streamed; no prompt_tokens output, no prompt tokens
    rest_tokens = len(b"plain text") + sum(len(t.encode()) for t in texts)
    assert delta(before, after, "servable_generation_tokens_total", protocol="rest") == rest_tokens
    assert delta(before, after, "servable_generation_tokens_total", protocol="zmq") == len(b"zmq!zmq stream")
    assert delta(before, after, "servable_prompt_tokens_total", protocol="rest") == 0
    # outcomes
    assert delta(before, after, "servable_requests_finished_total", protocol="rest", outcome="ok") == 2
    assert delta(before, after, "servable_requests_finished_total", protocol="rest", outcome="error") == 1
    assert delta(before, after, "servable_requests_finished_total", protocol="zmq", outcome="ok") == 2
    assert not any(dict(labels).get("servable") == "nothere" for _, labels in after)
    # the unlabelled totals count everything, as before (not the bodies that did not parse)
    assert after[("servable_requests_total", ())] - before[("servable_requests_total", ())] == 7
    assert after[("servable_request_errors_total", ())] - before[("servable_request_errors_total", ())] == 1


def test_metrics_from_before_keep_their_names_types_and_labels(cluster) -> None:
    _, _, rest, _ = cluster
    assert rest.post("/model/streamer:generate_plain", body("abc")).status_code == 200
    # the Workers report their batch counts with each heartbeat
    wait_until(lambda: "servable_model_batches_total{" in rest.get("/metrics").text, 10, "batch metrics")
    types, samples = scrape(rest)
    assert {name: types.get(name) for name in (
        "servable_requests", "servable_request_errors", "servable_requests_rejected", "servable_requests_inflight",
        "servable_model_batches", "servable_model_instances", "servable_model_batches_joined",
        "servable_model_instances_cancelled", "servable_ready")} == {
        "servable_requests": "counter", "servable_request_errors": "counter", "servable_requests_rejected": "counter",
        "servable_requests_inflight": "gauge", "servable_model_batches": "counter",
        "servable_model_instances": "counter", "servable_model_batches_joined": "counter",
        "servable_model_instances_cancelled": "counter", "servable_ready": "gauge"}
    assert samples[("servable_ready", (("servable", "streamer"),))] == 1.0
    assert samples[("servable_requests_inflight", ())] == 0.0
    labels = {tuple(k for k, _ in key) for name, key in samples if name == "servable_model_instances_cancelled_total"}
    assert labels == {("model", "servable", "when", "worker")}
    text = rest.get("/metrics").text
    assert 'servable_ready{servable="streamer"} 1.0' in text and "servable_requests_inflight 0" in text
