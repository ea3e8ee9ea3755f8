"""server/metrics.py's TokenHistogram (the per-token inter-token-latency histogram) exposes exactly
what prometheus_client's Histogram exposes for the same observations."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from modelhive.server.metrics import ITL_BUCKETS, TokenHistogram


def _series_lines(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines()
                  if line.startswith("x_seconds_") and "_created" not in line)


def test_same_buckets_count_and_sum_as_prometheus_histogram():
    rng = random.Random(3)
    values = [rng.expovariate(8.0) for _ in range(2000)] + list(ITL_BUCKETS) + [0.0, 500.0]
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = TokenHistogram("x_seconds", "x", ITL_BUCKETS, ["a", "b"])
    ours_registry.register(ours)
    theirs = Histogram("x_seconds", "x", ["model_name"], buckets=ITL_BUCKETS,
                       registry=theirs_registry)
    theirs.labels("b")  # both models' series exist before any observation
    for i, v in enumerate(values):
        model = "a" if i % 3 else "b"
        ours.labels(model).observe(v)
        theirs.labels(model).observe(v)
    ours_lines, theirs_lines = _series_lines(ours_registry), _series_lines(theirs_registry)
    assert len(ours_lines) == 2 * (len(ITL_BUCKETS) + 3)  # buckets, +Inf, count, sum per model
    for mine, reference in zip(ours_lines, theirs_lines, strict=True):
        name, value = mine.rsplit(" ", 1)
        ref_name, ref_value = reference.rsplit(" ", 1)
        assert name == ref_name
        assert abs(float(value) - float(ref_value)) <= 1e-9 * max(1.0, abs(float(ref_value)))
