"""``modelhive bench serve``: the load generator's command line (arguments and ``run``).

    modelhive bench serve --base-url http://127.0.0.1:8000 --pattern skewed \\
        --num-requests 300 --request-rate 20 --prompt-len 64 192 --output-len 32 128 \\
        --time-limit 60 --json out.json --plot occupancy.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhive.bench.load.patterns import ARRIVALS, PATTERNS, PROMPT_KINDS, Workload, parse_mix
from modelhive.bench.load.report import build_report, format_report
from modelhive.errors import ConfigError

if TYPE_CHECKING:
    from modelhive.bench.load.generator import BenchRun


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="the server (default http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--model", action="append",
                        help="a served model (repeatable); default: every model /v1/models lists")
    parser.add_argument("--pattern", choices=PATTERNS, default="uniform")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--request-rate", type=float, default=10.0,
                        help="requests per second, all models together; inf: all at once")
    parser.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 128), metavar=("LOW", "HIGH"),
                        help="prompt length, uniform in [LOW, HIGH] (tokens; words for text)")
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 64), metavar=("LOW", "HIGH"),
                        help="output tokens, uniform in [LOW, HIGH] (sent with ignore_eos)")
    parser.add_argument("--prompt-kind", choices=PROMPT_KINDS, default="ids",
                        help="token ids (exact lengths) or generated text")
    parser.add_argument("--token-id-range", type=int, nargs=2, default=(10, 500),
                        metavar=("LOW", "HIGH"), help="ids of 'ids' prompts, in [LOW, HIGH)")
    parser.add_argument("--mix", help="uniform pattern's weights, e.g. a=3,b=1")
    parser.add_argument("--hot-model", help="skewed: the busy model (default: the first)")
    parser.add_argument("--hot-fraction", type=float, default=0.8)
    parser.add_argument("--burst-period", type=float, default=2.0,
                        help="bursty: seconds of each model's turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=math.inf,
                        help="send no request after this many seconds")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds in-flight requests get after the time limit")
    parser.add_argument("--honour-retry-after", action=argparse.BooleanOptionalAction,
                        default=False, help="retry 429/503 after Retry-After seconds")
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--poll-interval", type=float, default=0.1,
                        help="seconds between /metrics scrapes for the occupancy plot")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--plot", help="write the pool occupancy PNG here (default: beside --json)")


def workload_from_args(args: argparse.Namespace, models: list[str]) -> Workload:
    try:
        return Workload(models=tuple(models), pattern=args.pattern, num_requests=args.num_requests,
                        request_rate=args.request_rate, arrival=args.arrival,
                        prompt_len=tuple(args.prompt_len), output_len=tuple(args.output_len),
                        prompt_kind=args.prompt_kind, token_id_range=tuple(args.token_id_range),
                        mix=parse_mix(args.mix), hot_model=args.hot_model,
                        hot_fraction=args.hot_fraction, burst_period_s=args.burst_period,
                        seed=args.seed)
    except ValueError as exc:
        raise ConfigError(str(exc), key="bench") from None


def workload_config(workload: Workload, **extra: Any) -> dict[str, Any]:
    """The workload's settings as JSON-ready values (echoed in the report)."""
    config = {k: getattr(workload, k) for k in Workload.__dataclass_fields__}
    config["models"] = list(workload.models)
    config["mix"] = dict(workload.mix) if workload.mix else None
    return {**config, **extra}


def finish(run: BenchRun, workload: Workload, json_path: str | None, plot_path: str | None,
           **extra: Any) -> dict[str, Any]:
    """Build the report, write the PNG and the JSON where asked; returns the report."""
    from modelhive.bench.load.occupancy import plot_occupancy

    if plot_path is None and json_path:
        plot_path = str(Path(json_path).with_suffix(".png"))
    title = f"{workload.pattern}: KV pool blocks per model ({run.base_url})"
    png = plot_path if plot_path and plot_occupancy(run.occupancy, plot_path, title) else None
    report = build_report(run, workload_config(workload, **extra), png)
    if json_path:
        Path(json_path).write_text(json.dumps(jsonable(report), indent=2, allow_nan=False))
    return report


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists and non-finite floats as strings ("inf"): strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    try:
        from modelhive.bench.load.generator import list_models, run_benchmark
    except ImportError as exc:
        raise ConfigError(f"modelhive bench serve needs {exc.name}: pip install httpx "
                          "prometheus_client matplotlib", key="bench") from None
    base_url = args.base_url.rstrip("/")
    models = args.model or asyncio.run(list_models(base_url, args.api_key))
    workload = workload_from_args(args, models)
    bench = run_benchmark(base_url, workload, time_limit_s=args.time_limit,
                          drain_timeout_s=args.drain_timeout,
                          honour_retry_after=args.honour_retry_after,
                          max_retries=args.max_retries, poll_interval_s=args.poll_interval,
                          api_key=args.api_key)
    result = asyncio.run(bench)
    report = finish(result, workload, args.json, args.plot, time_limit_s=args.time_limit,
                    honour_retry_after=args.honour_retry_after)
    print(format_report(report))
    return 1 if report["failed"] else 0
