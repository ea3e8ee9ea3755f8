"""Static vs shared KV pool, same config, same traffic: an A/B on identical code.

For one config, starts ``modelhive serve`` twice (``--policy static``, then ``--policy shared``;
everything else equal), runs each pattern (uniform, skewed, bursty) against each with the same
seeded workload (``modelhive bench serve``'s generator), and prints per pattern:

- p99 TTFT static vs shared (ratio static / shared: > 1 means shared is faster),
- output throughput (ratio shared / static), rejections (429+503), failures, preemptions,
- the most pool blocks in use, and the process memory peak vs the plan's budget: on CUDA the
  GPU memory NVML reports (the process's own where the driver tells, else the device's used
  memory minus what was in use before the server started); on the CPU the server's peak RSS minus
  the RSS of a bare interpreter that imports the same modules (the runtime the budget excludes).

    .venv/bin/python bench/static_vs_shared.py examples/three-models-cpu.yaml
    PYTHONPATH=src python3 bench/static_vs_shared.py examples/three-models-32gb.yaml \\
        --rate 40 --num-requests 800 --prompt-len 256 768 --output-len 64 256 --time-limit 20

Every report (JSON) and occupancy plot (PNG) goes to ``--out`` (default out/ab-CONFIG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from modelhive.bench.load.command import finish, jsonable
from modelhive.bench.load.generator import list_models, run_benchmark
from modelhive.bench.load.occupancy import BLOCKS_USED
from modelhive.bench.load.patterns import PATTERNS, Workload
from modelhive.config import load_config

POLICIES = ("static", "shared")


# ------------------------------------------------------------------------------- memory
class MemorySampler:
    """Peak memory of the server process, sampled every ``interval_s`` on a thread (bytes)."""

    def __init__(self, use_nvml: bool, interval_s: float = 0.1):
        """Create before the server starts: the device's idle memory is read here."""
        self.pid, self.use_nvml, self.interval_s = 0, use_nvml, interval_s
        self.peak = 0
        self.source = "rss"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._nvml = None
        self.baseline = 0
        if use_nvml:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def start(self, pid: int) -> MemorySampler:
        self.pid = pid
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak

    def sample(self) -> int:
        if self._nvml is None:
            self.source = "rss"
            return rss_bytes(self.pid)
        nvml = self._nvml
        try:
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == self.pid and proc.usedGpuMemory:
                    self.source = "nvml process"
                    return int(proc.usedGpuMemory)
        except nvml.NVMLError:
            pass
        self.source = "nvml device used - idle"
        return nvml.nvmlDeviceGetMemoryInfo(self._handle).used - self.baseline

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval_s)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def runtime_rss_bytes() -> int:
    """RSS of an interpreter that imported what the server imports, before any model loads."""
    code = ("import torch, uvicorn, fastapi, modelhive.cli.serve, modelhive.server.app, "
            "modelhive.engine.hive, modelhive.models.loader; "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) * 1024


# ------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``modelhive serve CONFIG --policy P`` as a subprocess on 127.0.0.1."""

    def __init__(self, config: str, policy: str, serve_args: list[str], log_path: Path,
                 startup_timeout_s: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "modelhive", "serve", config, "--policy", policy,
               "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log", *serve_args]
        self.log_path = log_path
        self.policy, self.startup_timeout_s = policy, startup_timeout_s
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self) -> None:
        policy, log_path = self.policy, self.log_path
        startup_timeout_s = self.startup_timeout_s
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server ({policy}) exited with {self.proc.returncode}:\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server ({policy}) not healthy in {startup_timeout_s} s; "
                           f"see {log_path}")

    def metric(self, name: str) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    key = sample.labels.get("model_name") or sample.labels.get("term") or ""
                    out[key] = sample.value
        return out

    def wait_idle(self, timeout_s: float = 120.0) -> bool:
        """Wait until no block is in use and nothing waits or runs (between patterns)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = (sum(self.metric(BLOCKS_USED).values())
                    + sum(self.metric("vllm:num_requests_waiting").values())
                    + sum(self.metric("vllm:num_requests_running").values()))
            if busy == 0:
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def planned_budget(server: Server) -> int:
    """The plan's budget (bytes) from /metrics, under either name the server has used."""
    old = server.metric("modelhive:planned_memory_bytes").get("budget")
    if old is not None:
        return int(old)
    new = server.metric("modelhive:memory_planned_bytes").get("process")
    if new is None:
        raise RuntimeError("the server's /metrics has no planned budget "
                           "(modelhive:memory_planned_bytes{term=\"process\"})")
    return int(new)


# ------------------------------------------------------------------------------- A/B
def workload_for(args: argparse.Namespace, models: list[str], pattern: str) -> Workload:
    return Workload(models=tuple(models), pattern=pattern, num_requests=args.num_requests,
                    request_rate=args.rate_for.get(pattern, args.rate), arrival=args.arrival,
                    prompt_len=tuple(args.prompt_len), output_len=tuple(args.output_len),
                    token_id_range=tuple(args.token_id_range), hot_model=args.hot_model,
                    burst_period_s=args.burst_period, seed=args.seed)


def run_policy(args: argparse.Namespace, policy: str, use_nvml: bool, runtime_rss: int,
               out: Path) -> dict[str, dict]:
    sampler = MemorySampler(use_nvml)
    server = Server(args.config, policy, args.serve_arg, out / f"server-{policy}.log",
                    args.startup_timeout)
    results = {}
    try:
        sampler.start(server.proc.pid)  # loading counts too
        server.wait_healthy()
        budget = planned_budget(server)
        models = asyncio.run(list_models(server.url))
        if args.warmup_requests:  # first-use costs (Triton JIT, allocator growth) out of the A/B
            warm = Workload(models=tuple(models), num_requests=args.warmup_requests * len(models),
                            request_rate=math.inf, prompt_len=tuple(args.prompt_len),
                            output_len=(4, 8), token_id_range=tuple(args.token_id_range), seed=99)
            asyncio.run(run_benchmark(server.url, warm, drain_timeout_s=args.drain_timeout))
        for pattern in args.patterns:
            if not server.wait_idle():
                print(f"warning: {policy} server not idle before {pattern}", file=sys.stderr)
            workload = workload_for(args, models, pattern)
            run = asyncio.run(run_benchmark(server.url, workload, time_limit_s=args.time_limit,
                                            drain_timeout_s=args.drain_timeout,
                                            honour_retry_after=args.honour_retry_after))
            report = finish(run, workload, str(out / f"{pattern}-{policy}.json"), None,
                            policy=policy, time_limit_s=args.time_limit)
            report["memory"] = {"peak_bytes": sampler.peak, "budget_bytes": budget,
                                "source": sampler.source}
            results[pattern] = report
            print(f"[{policy}] {pattern}: {report['completed']}/{report['sent']} completed, "
                  f"{report['rejected']['total']} rejected, {report['failed']} failed, "
                  f"p99 TTFT {report['ttft_ms']['p99'] or float('nan'):.0f} ms, "
                  f"{report['output_throughput_tok_s']:.0f} tok/s", flush=True)
        peak = sampler.stop()
        if not use_nvml:
            peak -= runtime_rss
        for report in results.values():
            report["memory"]["run_peak_bytes"] = peak
            report["memory"]["source"] = sampler.source + (
                " - runtime RSS" if not use_nvml else "")
    finally:
        code = server.stop()
        if code not in (0, None):
            print(f"warning: {policy} server exited with {code}; see {server.log_path}",
                  file=sys.stderr)
    return results


def _ratio(num: float | None, den: float | None) -> str:
    if not num or not den:
        return "-"
    return f"{num / den:.2f}x"


def _size(num_bytes: int) -> str:
    return (f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30
            else f"{num_bytes / 2**20:.1f} MiB")


def table(results: dict[str, dict[str, dict]], patterns: list[str]) -> str:
    """The A/B table (markdown): one row per pattern."""
    head = ("| pattern | p99 TTFT static / shared (ms) | TTFT ratio | throughput static / shared "
            "(tok/s) | throughput ratio | rejected static / shared | failed static / shared | "
            "preemptions static / shared | max pool blocks static / shared | memory peak static "
            "/ shared vs budget |")
    lines = [head, "|" + "---|" * 10]
    for p in patterns:
        s, h = results["static"][p], results["shared"][p]
        ts, th = s["ttft_ms"]["p99"], h["ttft_ms"]["p99"]
        lines.append(
            f"| {p} | {ts or 0:.0f} / {th or 0:.0f} | {_ratio(ts, th)} | "
            f"{s['output_throughput_tok_s']:.0f} / {h['output_throughput_tok_s']:.0f} | "
            f"{_ratio(h['output_throughput_tok_s'], s['output_throughput_tok_s'])} | "
            f"{s['rejected']['total']} / {h['rejected']['total']} | "
            f"{s['failed']} / {h['failed']} | {s['preemptions']} / {h['preemptions']} | "
            f"{s['pool']['max_used_blocks']} / {h['pool']['max_used_blocks']} "
            f"(of {h['pool']['total_blocks']}) | "
            f"{_size(s['memory']['run_peak_bytes'])} / {_size(h['memory']['run_peak_bytes'])} "
            f"vs {_size(h['memory']['budget_bytes'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--patterns", default="bursty,skewed,uniform",
                        help="comma-separated, run in this order")
    parser.add_argument("--num-requests", type=int, default=600)
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s, all models")
    parser.add_argument("--rate-for", action="append", default=[], metavar="PATTERN=RATE",
                        help="another rate for one pattern, e.g. skewed=32 (repeatable)")
    parser.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(64, 192))
    parser.add_argument("--output-len", type=int, nargs=2, default=(32, 128))
    parser.add_argument("--token-id-range", type=int, nargs=2, default=(10, 500))
    parser.add_argument("--hot-model", help="skewed: the busy model (default: the first)")
    parser.add_argument("--burst-period", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=15.0, help="seconds of sending")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--honour-retry-after", action="store_true")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="extra `modelhive serve` argument for both runs, e.g. "
                        "--serve-arg=--max-num-seqs=128 (repeatable)")
    parser.add_argument("--warmup-requests", type=int, default=8,
                        help="requests per model sent (all at once) and discarded before the "
                        "patterns, so first-use costs such as Triton compilation stay out")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--out", help="directory for the JSON reports and PNGs")
    args = parser.parse_args(argv)
    args.patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    unknown = sorted(set(args.patterns) - set(PATTERNS))
    if unknown:
        parser.error(f"unknown pattern(s) {', '.join(unknown)}")
    try:
        args.rate_for = {p: float(r) for p, _, r in (x.partition("=") for x in args.rate_for)}
    except ValueError:
        parser.error("--rate-for expects PATTERN=RATE")
    config = load_config(args.config)
    use_nvml = config.device == "cuda" or (config.device == "auto" and _has_nvml())
    out = Path(args.out or f"out/ab-{Path(args.config).stem}")
    out.mkdir(parents=True, exist_ok=True)
    runtime_rss = 0 if use_nvml else runtime_rss_bytes()
    results = {policy: run_policy(args, policy, use_nvml, runtime_rss, out)
               for policy in POLICIES}
    text = table(results, args.patterns)
    print()
    print(text)
    summary = {"config": args.config, "argv": sys.argv, "memory_runtime_rss_bytes": runtime_rss,
               "table": text, "results": results}
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2, allow_nan=False))
    failed = sum(r["failed"] for per in results.values() for r in per.values())
    over = [p for per in results.values() for p, r in per.items()
            if r["memory"]["run_peak_bytes"] > r["memory"]["budget_bytes"]]
    if failed or over:
        print(f"MISS: {failed} failed requests; memory above budget in {over or 'none'}")
    return 1 if failed else 0


def _has_nvml() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
