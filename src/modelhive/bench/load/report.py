"""Statistics and the JSON/text report of one ``modelhive bench serve`` run.

Latency definitions (as ``vllm bench serve``), all measured by the client, in milliseconds:

- TTFT: request sent -> first streamed token chunk (includes queueing and prefill; with
  ``--honour-retry-after`` it is measured from the attempt that was accepted).
- TPOT: per request ``(e2e - ttft) / (output_tokens - 1)``, over requests with > 1 output token.
- ITL: every gap between consecutive token chunks of one request.
- E2E: request sent -> last chunk.

Counts: ``sent == completed + rejected + failed`` always; requests of the plan that the time limit
stopped before sending are ``not_sent``. Throughput is output tokens of completed requests over
the run's duration (first send -> last response).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99, max of ``values`` (None where there are no values)."""
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {"count": len(values), "mean": sum(values) / len(values),
            "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values)}


def latency_summary(results: Iterable[Any]) -> dict[str, dict]:
    """TTFT/TPOT/ITL/E2E summaries (ms) over the completed ``RequestResult``s in ``results``."""
    done = [r for r in results if r.outcome == "completed"]
    ttft = [r.ttft * 1e3 for r in done if r.ttft is not None]
    e2e = [r.e2e * 1e3 for r in done if r.e2e is not None]
    tpot = [(r.e2e - r.ttft) * 1e3 / (r.output_tokens - 1) for r in done
            if r.output_tokens > 1 and r.ttft is not None and r.e2e is not None]
    itl = [gap * 1e3 for r in done for gap in r.itls]
    return {"ttft_ms": summarize(ttft), "tpot_ms": summarize(tpot), "itl_ms": summarize(itl),
            "e2e_ms": summarize(e2e)}


def _counts(results: Sequence[Any], duration_s: float) -> dict[str, Any]:
    rejected = {"429": 0, "503": 0}
    for r in results:
        if r.outcome == "rejected":
            rejected[str(r.status)] = rejected.get(str(r.status), 0) + 1
    done = [r for r in results if r.outcome == "completed"]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "sent": len(results),
        "completed": len(done),
        "rejected": {**rejected, "total": sum(rejected.values())},
        "failed": sum(r.outcome == "failed" for r in results),
        "retries": sum(r.retries for r in results),
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        "output_tokens": output_tokens,
        "output_throughput_tok_s": output_tokens / duration_s if duration_s > 0 else 0.0,
        "request_throughput_req_s": len(done) / duration_s if duration_s > 0 else 0.0,
    }


def build_report(run: Any, config: dict[str, Any], occupancy_png: str | None = None
                 ) -> dict[str, Any]:
    """The JSON report of a ``BenchRun`` (see ``generator.py``); ``config`` is echoed as is."""
    results = run.results
    duration = run.duration_s
    models = list(run.models)
    per_model = {}
    for model in models:
        mine = [r for r in results if r.model == model]
        per_model[model] = {**_counts(mine, duration), **latency_summary(mine),
                            "not_sent": sum(1 for p in run.not_sent if p.model == model),
                            "preemptions": run.preemptions.get(model, 0),
                            "max_blocks_used": run.occupancy.max_used(model)}
    overall = {**_counts(results, duration), **latency_summary(results),
               "not_sent": len(run.not_sent),
               "preemptions": sum(run.preemptions.values()),
               "max_blocks_used": run.occupancy.max_total_used()}
    errors = [f"{r.model} #{r.index}: {r.error}" for r in results if r.outcome == "failed"]
    total_blocks = run.occupancy.total_blocks
    return {
        "config": config,
        "base_url": run.base_url,
        "models": models,
        "duration_s": duration,
        "planned": len(results) + len(run.not_sent),
        **overall,
        "pool": {"total_blocks": total_blocks,
                 "max_used_blocks": overall["max_blocks_used"],
                 "max_used_fraction": (overall["max_blocks_used"] / total_blocks
                                       if total_blocks else None),
                 "samples": len(run.occupancy.samples),
                 "poll_interval_s": run.occupancy.interval_s},
        "per_model": per_model,
        "errors": errors[:20],
        "occupancy_png": occupancy_png,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_report(report: dict[str, Any]) -> str:
    """A table per model plus the totals, for the terminal."""
    lines = [f"{report['config'].get('pattern', '?')} against {report['base_url']}: "
             f"{report['sent']} sent ({report['planned']} planned, {report['not_sent']} not sent "
             f"before the time limit) in {report['duration_s']:.1f} s"]
    head = (f"{'MODEL':<16}{'DONE':>6}{'429':>5}{'503':>5}{'FAIL':>5}{'PREEMPT':>8}"
            f"{'TOK/S':>9}  {'TTFT mean/p50/p99 ms':>24}  {'TPOT mean/p99':>14}"
            f"  {'ITL p99':>8}  {'E2E p50/p99 ms':>16}  {'MAX BLK':>7}")
    lines.append(head)
    rows = [(m, s) for m, s in report["per_model"].items()] + [("all", report)]
    for name, s in rows:
        t, p, i, e = s["ttft_ms"], s["tpot_ms"], s["itl_ms"], s["e2e_ms"]
        lines.append(
            f"{name:<16}{s['completed']:>6}{s['rejected']['429']:>5}{s['rejected']['503']:>5}"
            f"{s['failed']:>5}{s['preemptions']:>8}{s['output_throughput_tok_s']:>9.1f}  "
            f"{_ms(t['mean']) + '/' + _ms(t['p50']) + '/' + _ms(t['p99']):>24}  "
            f"{_ms(p['mean']) + '/' + _ms(p['p99']):>14}  {_ms(i['p99']):>8}  "
            f"{_ms(e['p50']) + '/' + _ms(e['p99']):>16}  {s['max_blocks_used']:>7}")
    pool = report["pool"]
    if pool["total_blocks"]:
        lines.append(f"pool: {pool['max_used_blocks']} of {pool['total_blocks']} blocks at most "
                     f"({100 * pool['max_used_fraction']:.0f} %), {pool['samples']} samples")
    if report.get("occupancy_png"):
        lines.append(f"occupancy plot: {report['occupancy_png']}")
    for err in report["errors"][:5]:
        lines.append(f"failed: {err}")
    return "\n".join(lines)
