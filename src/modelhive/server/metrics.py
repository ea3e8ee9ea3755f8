"""Prometheus metrics: vLLM's names (so vLLM dashboards work) plus the shared pool's own.

Everything lives in one ``CollectorRegistry`` owned by ``ServerMetrics`` (never the global one), shared
by the main app and the per-model-port apps. Engine state (queues, blocks, token counters) is read at
scrape time from ``AsyncEngine.stats``, the snapshot the engine thread refreshes after every step, so
scraping never touches the engine. Latencies are observed by the HTTP layer as deltas arrive:

- ``vllm:time_to_first_token_seconds``: request arrival at the server -> first token delta.
- ``vllm:inter_token_latency_seconds``: between consecutive token deltas of one completion.
- ``vllm:e2e_request_latency_seconds``: arrival -> last delta.

``vllm:kv_cache_usage_perc{model_name}`` is the fraction (0..1, as in vLLM) of the whole shared pool
that the model's sequences hold; summed over models it is the pool's usage.

``modelhive:memory_planned_bytes{model_name,term}`` / ``modelhive:memory_measured_bytes{...}``: the
memory plan beside what the process measures (``engine/memory_report.py``); hive-wide terms carry
``model_name=""``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from modelhive.engine.client import AsyncEngine
from modelhive.engine.memory_report import measure_memory, planned_model_terms, planned_terms
from modelhive.engine.output import CompletionDelta

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so histograms line up with vLLM's dashboards
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    """Gauges and counters computed from the engine's stats snapshot and memory plan."""

    def __init__(self, async_engine: AsyncEngine):
        self.async_engine = async_engine

    def collect(self) -> Iterable[Metric]:
        stats = self.async_engine.stats
        engine = self.async_engine.engine
        plan = engine.plan
        total = max(1, stats.total_blocks)

        def per_model(cls, name: str, doc: str, value_of) -> Metric:
            family = cls(name, doc, labels=["model_name"])
            for model, s in stats.models.items():
                family.add_metric([model], value_of(model, s))
            return family

        yield per_model(GaugeMetricFamily, "vllm:num_requests_running",
                        "Sequences in the running batch", lambda m, s: s.running)
        yield per_model(GaugeMetricFamily, "vllm:num_requests_waiting",
                        "Sequences waiting to be scheduled", lambda m, s: s.waiting)
        yield per_model(GaugeMetricFamily, "vllm:kv_cache_usage_perc",
                        "Fraction of the shared KV pool held by this model (0..1)",
                        lambda m, s: s.blocks_used / total)
        yield per_model(CounterMetricFamily, "vllm:prompt_tokens", "Prompt tokens admitted",
                        lambda m, s: s.prompt_tokens_total)
        yield per_model(CounterMetricFamily, "vllm:generation_tokens", "Tokens generated",
                        lambda m, s: s.generation_tokens_total)
        yield per_model(CounterMetricFamily, "vllm:num_preemptions", "Sequences preempted",
                        lambda m, s: s.preemptions_total)
        yield per_model(CounterMetricFamily, "modelhive:num_preemptions",
                        "Sequences preempted (recompute) to free pool blocks",
                        lambda m, s: s.preemptions_total)
        yield per_model(GaugeMetricFamily, "modelhive:kv_blocks_used",
                        "Pool blocks held by this model's sequences", lambda m, s: s.blocks_used)
        free = GaugeMetricFamily("modelhive:kv_blocks_free", "Pool blocks free")
        free.add_metric([], stats.free_blocks)
        yield free
        blocks = GaugeMetricFamily("modelhive:kv_blocks_total", "Blocks in the shared KV pool")
        blocks.add_metric([], stats.total_blocks)
        yield blocks
        block_bytes = GaugeMetricFamily("modelhive:kv_block_bytes", "Bytes per pool block")
        block_bytes.add_metric([], plan.block_bytes)
        yield block_bytes
        healthy = GaugeMetricFamily("modelhive:engine_healthy", "1 while the engine loop runs")
        healthy.add_metric([], 1.0 if self.async_engine.healthy else 0.0)
        yield healthy
        steps = CounterMetricFamily("modelhive:engine_steps", "Engine steps run")
        steps.add_metric([], stats.steps)
        yield steps
        yield from _plan_metrics(plan)
        yield from _memory_metrics(engine)


def _plan_metrics(plan) -> Iterable[Metric]:
    """Per-model plan facts (tokens, blocks) that are not memory terms."""
    spec = {
        "modelhive:kv_bytes_per_token": ("KV bytes one token of this model needs",
                                         lambda m: m.kv_bytes_per_token),
        "modelhive:kv_tokens_per_block": ("Tokens of this model one pool block holds",
                                          lambda m: m.tokens_per_block),
        "modelhive:kv_blocks_guaranteed": ("Pool blocks reserved for this model (its minimum)",
                                           lambda m: m.min_blocks),
        "modelhive:max_model_len": ("Prompt + output tokens per sequence",
                                    lambda m: m.max_model_len),
    }
    for name, (doc, value_of) in spec.items():
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        for m in plan.models:
            family.add_metric([m.name], value_of(m))
        yield family


def _memory_metrics(engine) -> Iterable[Metric]:
    """Memory planned (before loading) and measured (now), per term: hive-wide series have
    ``model_name=""`` (terms weights, activation, graphs, overhead, kv_pool, process; planned
    process = the budget), per-model series the model's name (weights, activation, graphs).
    A measured term that was not measured (graphs before capture, activation where the dry step
    could not be read) has no series."""
    plan = engine.plan
    measured = measure_memory(engine)
    planned = GaugeMetricFamily("modelhive:memory_planned_bytes",
                                "Device memory planned before loading, per term (bytes)",
                                labels=["model_name", "term"])
    got = GaugeMetricFamily("modelhive:memory_measured_bytes",
                            "Device memory measured in this process, per term (bytes)",
                            labels=["model_name", "term"])
    measured_terms = measured.terms()
    for term, value in planned_terms(plan).items():
        planned.add_metric(["", term], value)
        if measured_terms[term] is not None:
            got.add_metric(["", term], measured_terms[term])
    for m in plan.models:
        per_model = measured.model_terms(m.name)
        for term, value in planned_model_terms(plan, m.name).items():
            planned.add_metric([m.name, term], value)
            if per_model[term] is not None:
                got.add_metric([m.name, term], per_model[term])
    yield planned
    yield got


class TokenHistogram(Collector):
    """A per-model histogram observed once per streamed token, on the event loop: a bucket
    search and two additions (~0.3 us), where ``prometheus_client.Histogram.observe`` takes a
    lock per bucket and sum update (~5 us a token on a 2-core CPU, 14 % of the event loop's
    time at 256 streams). Exposed as an ordinary histogram at scrape time. Not for use from
    several threads at once (the server feeds and scrapes it on its one event loop)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 models: Iterable[str]):
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self.series = {m: TokenSeries(self.bounds) for m in models}

    def labels(self, model: str) -> TokenSeries:
        series = self.series.get(model)
        if series is None:
            series = self.series[model] = TokenSeries(self.bounds)
        return series

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model_name"])
        for model, series in self.series.items():
            counts = list(series.counts)  # one consistent copy
            buckets, total = [], 0
            for bound, n in zip(self.bounds, counts, strict=False):
                total += n
                buckets.append((floatToGoString(bound), total))
            buckets.append(("+Inf", total + counts[-1]))
            family.add_metric([model], buckets, series.sum)
        yield family


class TokenSeries:
    """One model's buckets (the last one past every bound) and sum."""

    def __init__(self, bounds: list[float]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class ServerMetrics:
    """The registry of one server process, and the latency histograms the HTTP layer feeds."""

    def __init__(self, async_engine: AsyncEngine):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(async_engine))
        labels = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = TokenHistogram("vllm:inter_token_latency_seconds", "Time between tokens",
                                  ITL_BUCKETS, async_engine.engine.models)
        self.registry.register(self.itl)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, end to end",
                             labels, buckets=E2E_BUCKETS, registry=self.registry)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason",
                               ["model_name", "finished_reason"], registry=self.registry)
        for model in async_engine.engine.models:  # every series exists from the start
            for histogram in (self.ttft, self.e2e):
                histogram.labels(model)
            for reason in ("stop", "length", "abort", "error"):
                self.success.labels(model, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, model: str) -> RequestTimer:
        return RequestTimer(self, model)


class RequestTimer:
    """Observes one request's TTFT, inter-token latencies and end-to-end latency (per token, on
    the event loop: the model's series are looked up once per request, not once per token)."""

    def __init__(self, metrics: ServerMetrics, model: str):
        self.metrics = metrics
        self.model = model
        self._ttft = metrics.ttft.labels(model)
        self._itl = metrics.itl.labels(model)
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: dict[tuple[int, int], float] = {}

    def on_delta(self, delta: CompletionDelta, prompt_index: int = 0) -> None:
        now = time.perf_counter()
        if delta.token_ids:
            key = (prompt_index, delta.index)
            if self.first_token is None:
                self.first_token = now
                self._ttft.observe(now - self.arrival)
            last = self.last_token.get(key)
            if last is not None:
                self._itl.observe(now - last)
            self.last_token[key] = now
        if delta.finish_reason is not None:
            self.metrics.success.labels(self.model, delta.finish_reason).inc()

    def finish(self) -> None:
        self.metrics.e2e.labels(self.model).observe(time.perf_counter() - self.arrival)
