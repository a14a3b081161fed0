"""Main's Prometheus metrics (``GET /metrics``), with the standard ``prometheus_client`` library: one
`CollectorRegistry` per Main (never the library's global one), rendered by `generate_latest`.

Per servable and protocol (labels ``servable``, ``protocol``: ``rest`` (MindSpore's REST), ``zmq``, ``openai``,
``kserve``), names and bucket edges as vLLM's so that dashboards carry over:

* ``servable_request_latency_seconds`` (histogram): from when the Dispatcher receives a request to when its
  answer (or its stream's last piece) is there, before the front end writes it; requests that succeeded as a
  whole (instances may have failed one by one). vLLM's e2e edges 0.3 ... 7680 s, preceded by 1 ms ... 0.1 s ones
  for the non-LLM servables.
* ``servable_time_to_first_token_seconds`` (histogram): streaming requests, per instance (one generated
  sequence): from when the Dispatcher receives the request to the instance's first piece with output from the
  Worker (before the HTTP / ZMQ write). vLLM's edges, 1 ms ... 2560 s.
* ``servable_time_per_output_token_seconds`` (histogram): streaming requests, per instance: the time between
  two consecutive pieces with output (a piece normally carries one decode step's new tokens: vLLM's
  inter-token latency). vLLM's edges, 10 ms ... 80 s.
* ``servable_prompt_tokens_total``, ``servable_generation_tokens_total`` (counters), from the outputs of each
  instance (the OpenAI chat method's convention, `servable_framework.main.openai_api`): prompt tokens from the
  output ``prompt_tokens``, generated tokens from ``completion_tokens``, else from the first of ``tokens``,
  ``token_ids``, ``output_ids`` (`GENERATED_OUTPUTS`; a method should have one of them). An integer array of
  token ids (1-d) counts its rows, as they stream (the new rows of each piece); a 0-d integer is the count (it
  comes whole, in a streaming instance's last piece). A servable whose outputs are text only counts no tokens.
* ``servable_requests_finished_total`` (counter, label ``outcome``: ``ok``, ``error``, ``cancelled`` = the
  client went away): every request admitted to a Worker.

Requests refused before a Worker is picked (unknown servable or method, overload, bad instance count) are not
labelled by servable (a client could make up any name); they count in the unlabelled ``servable_requests_total``,
``servable_request_errors_total`` and ``servable_requests_rejected_total`` as before.

The metrics from before (``servable_requests_*``, ``servable_model_*``, ``servable_ready``) are read from the
Dispatcher and the Worker handles when scraped (`DispatcherCollector`); their names, types and labels are
unchanged. So is ``servable_worker_instances_total{servable, worker}``: the instances each Worker answered.

For protocol modules (OpenAI, KServe): call ``dispatcher.predict(..., protocol="openai")`` /
``dispatcher.predict_stream(..., protocol="openai")``; everything above is then recorded, nothing else to do.
A request your module answers *without* an admitted Dispatcher call (e.g. refused by your own validation) can
be counted with ``dispatcher.metrics.observe_request(servable, "openai", seconds, ok=False)``; never for a request
that went through the Dispatcher (it would count twice). Names of servables that do not exist are ignored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from servable_framework.errors import ServingError
from servable_framework.wire import Instance, Value

if TYPE_CHECKING:
    from servable_framework.main.dispatcher import Dispatcher

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the Prometheus text format, as before
PROTOCOLS = ("rest", "zmq", "openai", "kserve")
Outcome = Literal["ok", "error", "cancelled"]

# vLLM's edges (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,  # ours: non-LLM servables answer in ms
                   0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)

PROMPT_OUTPUTS = ("prompt_tokens",)
GENERATED_OUTPUTS = ("completion_tokens", "tokens", "token_ids", "output_ids")  # the first one present counts


def outcome_of(exc: BaseException | None) -> Outcome:
    """``ok`` (no exception), ``cancelled`` (the caller went away: a cancelled task, a closed stream) or ``error``."""
    if exc is None:
        return "ok"
    return "cancelled" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else "error"


class Metrics:
    """The registry of one Main and the metrics the Dispatcher records per request."""

    def __init__(self, known_servable: Callable[[str], bool] = lambda _name: True) -> None:
        self.registry = CollectorRegistry()
        self._known = known_servable
        labels = ("servable", "protocol")
        self.latency = Histogram(
            "servable_request_latency_seconds",
            "Requests that succeeded: from when Main's Dispatcher received the request to when its answer (or the "
            "last piece of its stream) came from the Worker, before the front end writes it.",
            labels, registry=self.registry, buckets=LATENCY_BUCKETS)
        self.ttft = Histogram(
            "servable_time_to_first_token_seconds",
            "Streaming requests, per instance: from when Main's Dispatcher received the request to when the "
            "instance's first piece with output came from the Worker, before the front end writes it.",
            labels, registry=self.registry, buckets=TTFT_BUCKETS)
        self.tpot = Histogram(
            "servable_time_per_output_token_seconds",
            "Streaming requests, per instance: time between two consecutive pieces with output as Main receives "
            "them from the Worker (a piece is normally one decode step's new tokens).",
            labels, registry=self.registry, buckets=TPOT_BUCKETS)
        self.prompt_tokens = Counter(
            "servable_prompt_tokens",
            "Prompt tokens, from the output 'prompt_tokens' (token ids: their number; a 0-d integer: the count).",
            labels, registry=self.registry)
        self.generation_tokens = Counter(
            "servable_generation_tokens",
            "Generated tokens, from the output 'completion_tokens', else 'tokens', 'token_ids' or 'output_ids' "
            "(token ids: their number, as they stream; a 0-d integer: the count).",
            labels, registry=self.registry)
        self.finished = Counter(
            "servable_requests_finished",
            "Requests admitted to a Worker, by outcome: ok, error, cancelled (the client went away).",
            (*labels, "outcome"), registry=self.registry)
        self.direct_http = Counter(
            "servable_http_direct_requests",
            "MindSpore predict requests that Main's HTTP protocol answered itself, without an ASGI cycle "
            "(servable_framework.main.fast_http); the REST requests not counted here took the ASGI route.",
            registry=self.registry)
        polls = Counter(
            "servable_busy_polls",
            "Times Main polled for a Worker's answer instead of sleeping (servable_framework.busy_poll), by how "
            "the spin ended: event (the loop had something to handle: the answer, or anything else) or budget "
            "(busy_poll_us passed first).", ("ended",), registry=self.registry)
        self.busy_polls = {True: polls.labels("event"), False: polls.labels("budget")}  # by `BusyPoll`'s result
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def children(self, labels: tuple[str, str], outcome: Outcome) -> tuple[Any, Any]:
        """The latency and finished-count series of (servable, protocol) and ``outcome`` (kept: ``labels()``
        looks them up under a lock on every call)."""
        key = (*labels, outcome)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (self.latency.labels(*labels), self.finished.labels(*key))
        return pair

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        """The exposition text of every metric of this Main."""
        return generate_latest(self.registry)

    def request(self, servable: str, protocol: str, start: float | None = None) -> RequestRecord:
        """Start recording one admitted request (``start``: its `time.perf_counter` arrival time, else now)."""
        return RequestRecord(self, servable, protocol, time.perf_counter() if start is None else start)

    def observe_request(self, servable: str, protocol: str, seconds: float, ok: bool) -> None:
        """For protocol modules: record a request that did NOT go through `Dispatcher.predict` /
        `Dispatcher.predict_stream` (those record themselves): its latency (when ``ok``) and outcome. Ignored
        for a servable that does not exist."""
        if not self._known(servable):
            return
        if ok:
            self.latency.labels(servable, protocol).observe(max(0.0, seconds))
        self.finished.labels(servable, protocol, "ok" if ok else "error").inc()


class RequestRecord:
    """The timings and token counts of one request admitted by the Dispatcher."""

    def __init__(self, metrics: Metrics, servable: str, protocol: str, start: float) -> None:
        self._metrics = metrics
        self._labels = (servable, protocol)
        self._start = start
        self._last: dict[int, float] = {}  # per instance: when its latest piece with output came
        self._done = False

    def results(self, results: Iterable[Instance | ServingError]) -> None:
        """Count the tokens of a non-streaming request's instances that succeeded."""
        self.tokens(*token_counts(results))

    def tokens(self, prompt: int, generated: int) -> None:
        """Count a non-streaming request's tokens (`token_counts` of its results, e.g. from its Worker)."""
        for count, counter in ((prompt, self._metrics.prompt_tokens), (generated, self._metrics.generation_tokens)):
            if count > 0:
                counter.labels(*self._labels).inc(count)

    def piece(self, index: int, outputs: Instance) -> None:
        """One piece of instance ``index`` of a streaming request (not an error)."""
        now = time.perf_counter()
        if any(_nonempty(v) for name, v in outputs.items() if name not in PROMPT_OUTPUTS):
            before = self._last.get(index)
            if before is None:
                self._metrics.ttft.labels(*self._labels).observe(now - self._start)
            else:
                self._metrics.tpot.labels(*self._labels).observe(now - before)
            self._last[index] = now
        self._tokens(outputs)  # the new rows of token ids; 0-d counts come in the last piece only

    def finish(self, outcome: Outcome) -> None:
        """The request ended (only the first call counts)."""
        if self._done:
            return
        self._done = True
        latency, finished = self._metrics.children(self._labels, outcome)
        if outcome == "ok":
            latency.observe(time.perf_counter() - self._start)
        finished.inc()

    def _tokens(self, outputs: Instance) -> None:
        self.tokens(_output_tokens(outputs, PROMPT_OUTPUTS), _output_tokens(outputs, GENERATED_OUTPUTS))


def token_counts(results: Iterable[Instance | ServingError]) -> tuple[int, int]:
    """(prompt, generated) tokens of the instances that succeeded (`PROMPT_OUTPUTS`, `GENERATED_OUTPUTS`)."""
    prompt = generated = 0
    for result in results:
        if not isinstance(result, ServingError):
            prompt += _output_tokens(result, PROMPT_OUTPUTS)
            generated += _output_tokens(result, GENERATED_OUTPUTS)
    return prompt, generated


def _output_tokens(outputs: Instance, names: tuple[str, ...]) -> int:
    """The tokens of the first of ``names`` that ``outputs`` has (0: none)."""
    name = next((n for n in names if n in outputs), None)
    return 0 if name is None else _tokens(outputs[name])


def _nonempty(value: Value) -> bool:
    """A piece's output that carries something new: text or bytes, or rows of an array (0-d arrays come whole
    in the last piece only and are no tokens)."""
    if isinstance(value, np.ndarray):
        return value.ndim > 0 and len(value) > 0
    if isinstance(value, (str, bytes)):
        return len(value) > 0
    return True  # a tensor in a client's shared memory (never streamed)


def _tokens(value: Value) -> int:
    """The tokens an output stands for: the rows of an integer array of token ids, or a 0-d integer count."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
        return 0
    return len(value) if value.ndim else max(0, int(value))


class DispatcherCollector(Collector):
    """The metrics from before prometheus_client, read from the Dispatcher and its Worker handles when scraped
    (the Workers report their batch counts with each heartbeat)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def describe(self) -> Iterable[Metric]:
        return []  # collected on scrape only

    def collect(self) -> Iterable[Metric]:
        d = self.dispatcher
        yield _counter("servable_requests_total", "Requests received by Main.", (), [((), d.stats["requests"])])
        yield _counter("servable_request_errors_total", "Requests that failed as a whole.", (),
                       [((), d.stats["errors"])])
        yield _counter("servable_requests_rejected_total", "Requests shed by the queue limit.", (),
                       [((), d.stats["rejected"])])
        inflight = GaugeMetricFamily("servable_requests_inflight", "Requests admitted and not yet answered.",
                                     value=d.inflight)
        yield inflight
        labels = ("servable", "model", "worker")
        batches: list[tuple[tuple[str, ...], float]] = []
        instances: list[tuple[tuple[str, ...], float]] = []
        joined: list[tuple[tuple[str, ...], float]] = []
        cancelled: list[tuple[tuple[str, ...], float]] = []
        for h in d.workers.workers.values():
            for model, (b, i, *rest) in h.batch_stats.items():
                values = (h.servable, str(model), str(h.worker_id))
                batches.append((values, b))
                instances.append((values, i))
                joined.append((values, rest[0] if rest else 0))
                cancelled.append(((*values, "queued"), rest[2] if len(rest) > 2 else 0))
                cancelled.append(((*values, "running"), rest[1] if len(rest) > 1 else 0))
        answered = [((h.servable, str(h.worker_id)), h.instances_answered) for h in d.workers.workers.values()]
        yield _counter("servable_worker_instances_total",
                       "Instances of requests each Worker answered (Main spreads a request's instances over the "
                       "Workers of its servable).", ("servable", "worker"), answered)
        yield _counter("servable_model_batches_total", "Model calls (batches) run by Workers.", labels, batches)
        yield _counter("servable_model_instances_total", "Instances run in those model calls.", labels, instances)
        yield _counter("servable_model_batches_joined_total",
                       "Batches the Agents took into an already running batch (continuous batching).", labels, joined)
        yield _counter("servable_model_instances_cancelled_total",
                       "Instances of timed-out requests: dropped from the queue, or stopped early while generating.",
                       (*labels, "when"), cancelled)
        ready = GaugeMetricFamily("servable_ready", "1 when the servable has a READY Worker.", labels=["servable"])
        for name, state in d.ready().items():
            ready.add_metric([name], 1.0 if state["ready"] else 0.0)
        yield ready


def _counter(name: str, help_text: str, labels: Sequence[str],
             samples: Sequence[tuple[Sequence[str], float]]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family
