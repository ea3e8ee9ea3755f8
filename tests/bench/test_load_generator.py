"""``modelhive bench serve``: statistics on known data, patterns with a seeded RNG, and a short run
against a real ``modelhive serve`` subprocess (three tiny presets, a pool small enough to preempt,
queues small enough to reject)."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from modelhive.bench.load.command import finish, jsonable
from modelhive.bench.load.generator import run_benchmark
from modelhive.bench.load.occupancy import parse_metrics
from modelhive.bench.load.patterns import Workload, arrival_times, build_requests, parse_mix
from modelhive.bench.load.report import latency_summary, percentile, summarize
from modelhive.cli.main import build_parser
from tests.server.conftest import start_server

MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")


# ------------------------------------------------------------------------------ statistics
def test_percentile_matches_linear_interpolation_on_known_data():
    values = [15, 20, 35, 40, 50]
    assert percentile(values, 0) == 15
    assert percentile(values, 100) == 50
    assert percentile(values, 50) == 35
    assert percentile(values, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15
    assert percentile(values, 99) == pytest.approx(49.6)  # rank 3.96: 40 + 0.96 * 10
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2  # order does not matter
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_percentile_agrees_with_numpy():
    np = pytest.importorskip("numpy")
    rng = random.Random(3)
    for n in (1, 2, 7, 100, 1001):
        data = [rng.expovariate(1.0) for _ in range(n)]
        for q in (1, 25, 50, 90, 99, 99.9):
            assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))


def test_summarize_and_latency_summary():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s == {"count": 4, "mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7),
                 "p99": pytest.approx(3.97), "max": 4.0}
    assert summarize([])["p99"] is None

    def result(outcome, ttft, e2e, tokens, itls):
        return SimpleNamespace(outcome=outcome, ttft=ttft, e2e=e2e, output_tokens=tokens,
                               itls=itls)

    results = [result("completed", 0.1, 1.1, 11, [0.1] * 10),
               result("completed", 0.3, 0.3, 1, []),
               result("rejected", None, None, 0, []), result("failed", None, None, 0, [])]
    lat = latency_summary(results)
    assert lat["ttft_ms"]["count"] == 2 and lat["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert lat["tpot_ms"]["count"] == 1 and lat["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert lat["itl_ms"]["count"] == 10 and lat["itl_ms"]["p99"] == pytest.approx(100.0)
    assert lat["e2e_ms"]["max"] == pytest.approx(1100.0)


# -------------------------------------------------------------------------------- patterns
def test_skewed_sends_80_percent_to_the_hot_model():
    w = Workload(models=MODELS, pattern="skewed", num_requests=5000, seed=1)
    counts = Counter(r.model for r in build_requests(w))
    assert counts["tiny-llama"] / 5000 == pytest.approx(0.8, abs=0.02)
    assert counts["tiny-qwen2"] / 5000 == pytest.approx(0.1, abs=0.02)
    hot = Counter(r.model for r in build_requests(
        Workload(models=MODELS, pattern="skewed", num_requests=5000, hot_model="tiny-gemma3")))
    assert hot.most_common(1)[0] == ("tiny-gemma3", pytest.approx(4000, abs=100))


def test_uniform_is_even_and_mix_is_respected():
    counts = Counter(r.model for r in build_requests(
        Workload(models=MODELS, pattern="uniform", num_requests=6000, seed=2)))
    for m in MODELS:
        assert counts[m] / 6000 == pytest.approx(1 / 3, abs=0.02)
    mixed = Counter(r.model for r in build_requests(Workload(
        models=MODELS, num_requests=6000, mix=parse_mix("tiny-llama=3,tiny-qwen2=1"), seed=2)))
    assert mixed["tiny-gemma3"] == 0
    assert mixed["tiny-llama"] / 6000 == pytest.approx(0.75, abs=0.02)


def test_bursty_gives_each_model_its_turn():
    w = Workload(models=MODELS, pattern="bursty", num_requests=600, request_rate=50,
                 burst_period_s=1.0, seed=4)
    reqs = build_requests(w)
    for r in reqs:
        assert r.model == MODELS[int(r.send_at // 1.0) % 3]
    assert {r.model for r in reqs} == set(MODELS)  # 12 s of traffic: four turns each


def test_arrivals_lengths_and_prompts():
    rng = random.Random(0)
    poisson = arrival_times(Workload(models=MODELS, num_requests=4001, request_rate=20), rng)
    gaps = [b - a for a, b in zip(poisson, poisson[1:], strict=False)]
    assert poisson[0] == 0 and all(g >= 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert sum((g - 0.05) ** 2 for g in gaps) / len(gaps) == pytest.approx(0.05**2, rel=0.15)
    fixed = arrival_times(Workload(models=MODELS, num_requests=5, request_rate=4,
                                   arrival="fixed"), rng)
    assert fixed == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    burst = arrival_times(Workload(models=MODELS, num_requests=3, request_rate=math.inf), rng)
    assert burst == [0.0, 0.0, 0.0]
    w = Workload(models=MODELS, num_requests=300, prompt_len=(5, 9), output_len=(2, 4),
                 token_id_range=(10, 20), seed=7)
    reqs = build_requests(w)
    assert reqs == build_requests(w)  # seeded: identical traffic for an A/B
    assert {len(r.prompt) for r in reqs} == {5, 6, 7, 8, 9}
    assert {r.max_tokens for r in reqs} == {2, 3, 4}
    assert all(10 <= t < 20 for r in reqs for t in r.prompt)
    text = build_requests(Workload(models=MODELS, num_requests=5, prompt_kind="text",
                                   prompt_len=(4, 4)))
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 4 for r in text)


def test_workload_rejects_bad_settings():
    for bad in (dict(pattern="spiky"), dict(hot_model="nope"), dict(prompt_len=(9, 3)),
                dict(request_rate=0), dict(mix={"nope": 1.0}), dict(hot_fraction=0)):
        with pytest.raises(ValueError):
            Workload(models=MODELS, **bad)
    with pytest.raises(ValueError):
        parse_mix("tiny-llama:3")


def test_parse_metrics_reads_the_pool_gauges_and_the_preemption_counter():
    text = ('# TYPE modelhive:kv_blocks_used gauge\n'
            'modelhive:kv_blocks_used{model_name="a"} 3.0\n'
            'modelhive:kv_blocks_used{model_name="b"} 0.0\n'
            '# TYPE modelhive:kv_blocks_free gauge\nmodelhive:kv_blocks_free 7.0\n'
            '# TYPE modelhive:kv_blocks_total gauge\nmodelhive:kv_blocks_total 10.0\n'
            '# TYPE modelhive:num_preemptions counter\n'
            'modelhive:num_preemptions_total{model_name="a"} 4.0\n')
    m = parse_metrics(text)
    assert m["modelhive:kv_blocks_used"] == {"a": 3.0, "b": 0.0}
    assert m["modelhive:kv_blocks_free"] == {"": 7.0}
    assert m["modelhive:kv_blocks_total"] == {"": 10.0}
    assert m["modelhive:num_preemptions"] == {"a": 4.0}


def test_cli_registers_bench_serve():
    args = build_parser().parse_args(["bench", "serve", "--pattern", "bursty",
                                      "--num-requests", "7", "--prompt-len", "3", "5"])
    assert args.bench == "serve" and args.pattern == "bursty" and args.num_requests == 7
    assert tuple(args.prompt_len) == (3, 5)


# ------------------------------------------------------------------ against a real server
TIGHT_CONFIG = """\
memory: {memory}
device: cpu
models:
  - {{name: tiny-llama, source: "preset:tiny-llama", max_model_len: 256, max_num_seqs: 32,
      max_queue: 12}}
  - {{name: tiny-qwen2, source: "preset:tiny-qwen2", max_model_len: 256, max_num_seqs: 32,
      max_queue: 12}}
  - {{name: tiny-gemma3, source: "preset:tiny-gemma3", max_model_len: 256, max_num_seqs: 32,
      max_queue: 12}}
"""


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory):
    """Three tiny models, a pool of ~40 blocks (preemptions under load), queues of 12 (429s)."""
    from modelhive import ModelSpec
    from tests.engine.conftest import budget_for_blocks

    specs = [ModelSpec(name=n, source=f"preset:{n}", max_model_len=256, max_num_seqs=32)
             for n in MODELS]
    workdir = tmp_path_factory.mktemp("bench-serve")
    config = workdir / "tight.yaml"
    config.write_text(TIGHT_CONFIG.format(memory=budget_for_blocks(specs, 40)))
    srv = start_server(workdir, str(config), use_config=False)
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def test_short_run_reports_every_field_and_accounts_for_every_request(tight_server, tmp_path):
    workload = Workload(models=MODELS, pattern="skewed", num_requests=50, request_rate=math.inf,
                        prompt_len=(16, 64), output_len=(16, 48), seed=5)
    run = asyncio.run(run_benchmark(tight_server.url(), workload, time_limit_s=10,
                                    drain_timeout_s=60))
    json_path = tmp_path / "report.json"
    report = finish(run, workload, str(json_path), None, time_limit_s=10)
    assert json.loads(json_path.read_text()) == jsonable(report)  # strict JSON ("inf" rate)
    assert report["occupancy_png"] and (tmp_path / "report.png").stat().st_size > 1000

    # every request is accounted for, with a known outcome
    assert report["planned"] == 50 and report["not_sent"] == 0
    assert report["sent"] == 50
    assert report["completed"] + report["rejected"]["total"] + report["failed"] == report["sent"]
    assert report["failed"] == 0, report["errors"]
    assert report["rejected"]["429"] > 0  # 50 at once, queues of 12 per model
    assert report["completed"] > 0
    for model, per in report["per_model"].items():
        assert per["completed"] + per["rejected"]["total"] + per["failed"] == per["sent"], model
    assert sum(p["sent"] for p in report["per_model"].values()) == 50

    # completed requests produced exactly their max_tokens; every latency field is there
    planned = {p.index: p for p in build_requests(workload)}
    done = [r for r in run.results if r.outcome == "completed"]
    assert all(r.output_tokens == planned[r.index].max_tokens for r in done)
    assert report["output_tokens"] == sum(r.output_tokens for r in done)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = report[key]
        assert set(stats) == {"count", "mean", "p50", "p90", "p99", "max"}
        assert stats["count"] > 0 and 0 < stats["p50"] <= stats["p99"] <= stats["max"]
    assert report["ttft_ms"]["p99"] <= report["e2e_ms"]["max"]
    assert report["output_throughput_tok_s"] > 0 and report["duration_s"] > 0

    # the pool: sampled, bounded by its size, used; preemptions counted from /metrics deltas
    pool = report["pool"]
    assert pool["samples"] >= 3 and pool["total_blocks"] == 40
    assert 0 < pool["max_used_blocks"] <= 40
    assert report["preemptions"] == sum(p["preemptions"] for p in report["per_model"].values())
    assert report["preemptions"] > 0  # 40 blocks cannot hold a few dozen sequences


def test_retry_after_is_honoured_when_asked(tight_server):
    # 60 at once against 32 running and a queue of 12: some are refused however fast the
    # engine admits them (30 sometimes all fit while a loaded machine sent them)
    workload = Workload(models=("tiny-llama",), num_requests=60, request_rate=math.inf,
                        prompt_len=(8, 16), output_len=(8, 16), seed=9)
    plain = asyncio.run(run_benchmark(tight_server.url(), workload, time_limit_s=10))
    assert sum(r.outcome == "rejected" for r in plain.results) > 0
    assert all(r.retries == 0 for r in plain.results)
    patient = asyncio.run(run_benchmark(tight_server.url(), workload, time_limit_s=30,
                                        honour_retry_after=True, max_retries=20))
    assert sum(r.retries for r in patient.results) > 0
    assert all(r.outcome == "completed" for r in patient.results), \
        [r.error for r in patient.results if r.outcome != "completed"]


def test_time_limit_stops_sending(tight_server):
    workload = Workload(models=MODELS, num_requests=40, request_rate=10, arrival="fixed",
                        prompt_len=(4, 8), output_len=(2, 4))
    run = asyncio.run(run_benchmark(tight_server.url(), workload, time_limit_s=1.05))
    assert len(run.results) == 11  # sent at 0, 0.1, ..., 1.0 s
    assert len(run.not_sent) == 29
    assert all(r.outcome == "completed" for r in run.results)
