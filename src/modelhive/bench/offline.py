"""Offline benchmarks (no HTTP): latency, throughput, three-models. Each returns a JSON-able dict.

- ``latency``: ``batch`` prompts of ``prompt_len`` random tokens, ``new_tokens`` greedy tokens
  each. Decode speed = tokens of the decode steps / their wall time (each step ends with the
  sampler's one host sync, so wall time is real). Also the GPU time of one graph replay (events),
  which shows how much of a step the host adds.
- ``throughput``: ``num_requests`` requests, prompt and output lengths uniform in
  ``[min_len, max_len]``, all submitted at once; output tokens / wall time; the workload's ceiling
  is the sum over its steps of (weights + KV read) / copy bandwidth. The workload runs twice and
  the second pass is timed (the first compiles every kernel variant its steps need).
- ``three_models``: several architectures resident in one hive; a "Hello" prompt with
  ``new_tokens`` tokens to each, one after another, ``rounds`` times; ms per reply (median).

Roofline: ``bench/roofline.py``. Baseline: ``bench/hf_baseline.py`` (transformers ``generate``
on the same weights, same process). Random preset weights need ``preset:NAME`` sources.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from modelhive.bench.hf_baseline import build_hf_model, hf_generate_seconds
from modelhive.bench.roofline import decode_step_bytes
from modelhive.config import ModelSpec
from modelhive.engine.engine import Engine
from modelhive.engine.hive import build_engine, serving_gc
from modelhive.models.arch import ArchConfig
from modelhive.models.loader import resolve_source
from modelhive.planner.estimates import DECODE_STEPS
from modelhive.planner.memory import plan_memory
from modelhive.sampling_params import SamplingParams

DTYPE = "bfloat16"


@dataclass
class Setup:
    enforce_eager: bool
    bandwidth: float  # bytes/s, measured
    device: str = "cuda"
    decode_steps: int = DECODE_STEPS  # greedy decode steps per multi-step graph (1: none)


def preset_name(source: str) -> str:
    if not source.startswith("preset:"):
        raise ValueError(f"benchmarks build the transformers baseline from preset weights; got {source}")
    return source[len("preset:"):]


def budget_for(specs: list[ModelSpec], kv_tokens: dict[str, int], enforce_eager: bool,
               decode_steps: int = DECODE_STEPS) -> int:
    """A memory budget that leaves the KV pool room for ``kv_tokens[model]`` tokens of each model
    (x1.25 + 64 blocks), so the transformers baseline fits beside the hive."""
    archs = {s.name: resolve_source(s.source).arch for s in specs}
    total = torch.cuda.get_device_properties(0).total_memory
    big = plan_memory(specs, archs, device="cuda", budget=int(0.9 * total),
                      total_device_bytes=total, enforce_eager=enforce_eager,
                      decode_steps=decode_steps)
    fixed = big.budget_bytes - big.kv_pool_bytes
    kv = sum(archs[n].kv_bytes_per_token(DTYPE) * t for n, t in kv_tokens.items())
    return int(fixed + 1.25 * kv + 64 * big.block_bytes)


def make_engine(specs: list[ModelSpec], kv_tokens: dict[str, int], setup: Setup):
    engine = build_engine(specs, device=setup.device,
                          memory=budget_for(specs, kv_tokens, setup.enforce_eager,
                                            setup.decode_steps),
                          enforce_eager=setup.enforce_eager,  # captures graphs unless eager
                          decode_steps=setup.decode_steps)
    return engine


def _step_timed(engine) -> tuple[float, list]:
    start = time.perf_counter()
    deltas = engine.step()
    return time.perf_counter() - start, deltas


def _random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(300, vocab) for _ in range(n)] for n in lengths]


def _graph_replay_ms(engine, model: str, batch: int) -> float | None:
    graphs = engine.models[model].runner.decode_graphs
    if graphs is None:
        return None
    bs = next(b for b in graphs.batch_sizes if b >= batch)
    return replay_ms(graphs.graphs[bs][0])


def replay_ms(graph: torch.cuda.CUDAGraph, warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of one replay of ``graph`` (CUDA events, after ``warmup`` replays)."""
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def latency(source: str, setup: Setup, batch: int = 1, prompt_len: int = 128,
            new_tokens: int = 128, baseline_tokens: int = 32) -> dict:
    preset = preset_name(source)
    arch = resolve_source(source).arch
    name = preset
    max_len = prompt_len + new_tokens + 8
    spec = ModelSpec(name=name, source=source, dtype=DTYPE, max_model_len=max_len,
                     max_num_seqs=max(batch, 1),
                     max_num_batched_tokens=max(batch * prompt_len, 2048))
    engine = make_engine([spec], {name: batch * max_len}, setup)
    prompts = _random_prompts(arch.vocab_size, [prompt_len] * batch, seed=batch)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    # warm-up: one short request through prefill and a few decodes
    engine.add_request(name, prompts[0], SamplingParams(max_tokens=4, temperature=0.0,
                                                        ignore_eos=True))
    while engine.has_work:
        engine.step()
    for p in prompts:
        engine.add_request(name, p, params)
    decode_times, other_times, generated = [], [], 0
    with serving_gc():  # as `modelhive serve` runs once the engine is built
        t0 = time.perf_counter()
        step = 0
        while engine.has_work:
            elapsed, deltas = _step_timed(engine)
            n = sum(len(d.token_ids) for d in deltas)
            generated += n
            # the first step prefills (and samples the first token); the rest decode the batch
            (other_times if step == 0 else decode_times).append(elapsed)
            step += 1
        total = time.perf_counter() - t0
    assert generated == batch * new_tokens, (generated, batch * new_tokens)
    decode_tokens = batch * (len(decode_times))
    decode_s = sum(decode_times)
    # the mean, not the median: with multi-step graphs most engine steps hand out tokens
    # already on the host, and one step in ``decode_steps`` waits for the replay
    step_ms = 1e3 * decode_s / len(decode_times)
    mean_ctx = prompt_len + new_tokens // 2
    step_bytes = decode_step_bytes(arch, DTYPE, [mean_ctx] * batch)
    replay_ms = _graph_replay_ms(engine, name, batch)
    result = {
        "bench": "latency", "model": source, "batch": batch, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "enforce_eager": setup.enforce_eager,
        "decode_steps": setup.decode_steps,
        "decode_tok_s": decode_tokens / decode_s,
        "ms_per_step": step_ms,
        "end_to_end_tok_s": generated / total,
        "prefill_ms": 1e3 * sum(other_times),
        "graph_replay_ms": replay_ms,
        "step_bytes": step_bytes,
        "achieved_GB_s": step_bytes / (step_ms / 1e3) / 1e9,
        "roofline_tok_s": batch * setup.bandwidth / step_bytes,
        "pct_roofline": 100 * (step_bytes / setup.bandwidth) / (step_ms / 1e3),
        "pct_roofline_gpu_only": (100 * (step_bytes / setup.bandwidth) / (replay_ms / 1e3)
                                  if replay_ms else None),
    }
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    if baseline_tokens:
        hf = build_hf_model(preset, arch, torch.bfloat16, setup.device)
        ids = torch.tensor(prompts, device=setup.device)
        seconds = hf_generate_seconds(hf, ids, baseline_tokens)
        result["hf_tok_s"] = batch * baseline_tokens / seconds
        result["hf_new_tokens"] = baseline_tokens
        result["speedup_vs_hf"] = result["decode_tok_s"] / result["hf_tok_s"]
        del hf
        gc.collect()
        torch.cuda.empty_cache()
    return result


@dataclass
class ThroughputWorkload:
    """The throughput bench's requests over one engine: ``run()`` submits them all and steps the
    engine until it is idle (``bench/gpu_throughput_trace.py`` reuses it)."""

    name: str
    arch: ArchConfig
    engine: Engine
    prompts: list[list[int]]
    output_lens: list[int]
    #: SamplingParams settings of every request besides max_tokens (default: greedy)
    sampling: dict = field(default_factory=dict)

    def run(self, on_step=None) -> tuple[int, float]:
        """(tokens generated, seconds); ``on_step()``, if given, runs before every step."""
        engine = self.engine
        settings = {"temperature": 0.0, **self.sampling}
        for p, o in zip(self.prompts, self.output_lens, strict=True):
            engine.add_request(self.name, p, SamplingParams(max_tokens=o, ignore_eos=True,
                                                            **settings))
        generated = 0
        start = time.perf_counter()
        while engine.has_work:
            if on_step is not None:
                on_step()
            generated += sum(len(d.token_ids) for d in engine.step())
        return generated, time.perf_counter() - start


def throughput_workload(source: str, setup: Setup, num_requests: int = 256, min_len: int = 100,
                        max_len: int = 1024, max_num_seqs: int = 256,
                        seed: int = 0, sampling: dict | None = None) -> ThroughputWorkload:
    """``num_requests`` random prompts with prompt and output lengths uniform in
    ``[min_len, max_len]``, and an engine whose KV pool holds all of them at once;
    ``sampling``: SamplingParams settings of every request (default: greedy)."""
    preset = preset_name(source)
    arch = resolve_source(source).arch
    rng = random.Random(seed)
    prompt_lens = [rng.randint(min_len, max_len) for _ in range(num_requests)]
    output_lens = [rng.randint(min_len, max_len) for _ in range(num_requests)]
    model_len = 2 * max_len + 8
    spec = ModelSpec(name=preset, source=source, dtype=DTYPE, max_model_len=model_len,
                     max_num_seqs=max_num_seqs, max_num_batched_tokens=8192, max_queue=num_requests + 8)
    kv_tokens = sum(p + o for p, o in zip(prompt_lens, output_lens, strict=True))
    engine = make_engine([spec], {preset: min(kv_tokens, max_num_seqs * model_len)}, setup)
    prompts = _random_prompts(arch.vocab_size, prompt_lens, seed=seed + 1)
    return ThroughputWorkload(preset, arch, engine, prompts, output_lens, dict(sampling or {}))


def throughput(source: str, setup: Setup, num_requests: int = 256, min_len: int = 100,
               max_len: int = 1024, max_num_seqs: int = 256, baseline_tokens: int = 64,
               seed: int = 0, sampling: dict | None = None) -> dict:
    work = throughput_workload(source, setup, num_requests, min_len, max_len, max_num_seqs, seed,
                               sampling)
    preset, arch, engine, output_lens = work.name, work.arch, work.engine, work.output_lens
    runner = engine.models[preset].runner
    ideal = {"bytes": 0, "steps": 0, "prompt_steps": 0, "execute_s": 0.0, "prompt_s": 0.0}
    inner = runner.execute

    def counting_execute(batch):
        ctx = [s.num_cached + len(s.token_ids) for s in batch.seqs]
        ideal["bytes"] += decode_step_bytes(arch, DTYPE, ctx)
        ideal["steps"] += 1
        prompt = any(len(s.token_ids) > 1 for s in batch.seqs)
        t = time.perf_counter()
        out = inner(batch)
        t = time.perf_counter() - t
        ideal["execute_s"] += t
        ideal["prompt_steps"] += prompt
        ideal["prompt_s"] += t if prompt else 0.0
        return out

    runner.execute = counting_execute

    # The first pass is the warm-up: Triton compiles a kernel once per specialization of its
    # arguments, and the workload's mixed prefill/decode steps meet variants a short warm-up
    # does not; on a machine with a cold kernel cache those compiles would land in the timed
    # run (measured: 13,175 vs 26,302 tok/s for the same code, H200). The second pass is timed.
    work.run()
    ideal.update(bytes=0, steps=0, prompt_steps=0, execute_s=0.0, prompt_s=0.0)
    ahead = runner.ahead
    used0 = ahead.used if ahead is not None else 0
    with serving_gc():  # as `modelhive serve` runs once the engine is built
        generated, seconds = work.run()
    assert generated == sum(output_lens)
    ideal_s = ideal["bytes"] / setup.bandwidth
    result = {
        "bench": "throughput", "model": source, "num_requests": num_requests,
        "len_range": [min_len, max_len], "enforce_eager": setup.enforce_eager,
        "sampling": work.sampling or {"temperature": 0.0},
        "decode_steps": setup.decode_steps,
        "output_tokens": generated, "seconds": seconds, "tok_s": generated / seconds,
        "steps": ideal["steps"], "ms_per_step": 1e3 * seconds / max(1, ideal["steps"]),
        "bytes_read": ideal["bytes"], "achieved_GB_s": ideal["bytes"] / seconds / 1e9,
        "ceiling_s": ideal_s, "pct_roofline": 100 * ideal_s / seconds,
        # where the steps went: steps with a prompt chunk; decode steps that were already
        # launched ahead (their host work overlapped the GPU); seconds inside the runner
        # (launches + waiting for the GPU) vs the engine's own host work around it
        "prompt_steps": ideal["prompt_steps"],
        "ahead_steps": (ahead.used - used0) if ahead is not None else 0,
        "runner_s": ideal["execute_s"], "runner_prompt_s": ideal["prompt_s"],
    }
    del engine, runner, work
    gc.collect()
    torch.cuda.empty_cache()
    if baseline_tokens:
        hf = build_hf_model(preset, arch, torch.bfloat16, setup.device)
        batch = 32
        ids = torch.tensor(_random_prompts(arch.vocab_size, [128] * batch, seed=5),
                           device=setup.device)
        secs = hf_generate_seconds(hf, ids, baseline_tokens)
        result["hf_tok_s"] = batch * baseline_tokens / secs
        result["hf_setup"] = f"generate, batch {batch}, prompt 128, {baseline_tokens} new tokens"
        result["speedup_vs_hf"] = result["tok_s"] / result["hf_tok_s"]
        del hf
        gc.collect()
        torch.cuda.empty_cache()
    return result


def three_models(sources: list[str], setup: Setup, new_tokens: int = 10, rounds: int = 5,
                 baseline: bool = True) -> dict:
    names = [preset_name(s) for s in sources]
    max_len = 64
    specs = [ModelSpec(name=n, source=s, dtype=DTYPE, max_model_len=max_len, max_num_seqs=4,
                       max_num_batched_tokens=256) for n, s in zip(names, sources, strict=True)]
    engine = make_engine(specs, {n: 4 * max_len for n in names}, setup)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = {n: engine.tokenize(n, "Hello") for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    firsts: dict[str, list[float]] = {n: [] for n in names}  # to the first token (prompt step)
    with serving_gc():  # as `modelhive serve` runs once the engine is built
        for r in range(rounds + 1):
            for n in names:
                start = time.perf_counter()
                engine.add_request(n, ids[n], params)
                got = 0
                first = None
                while engine.has_work:
                    got += sum(len(d.token_ids) for d in engine.step())
                    if got and first is None:
                        first = time.perf_counter() - start
                elapsed = time.perf_counter() - start
                assert got == new_tokens
                if r:  # round 0 warms up
                    times[n].append(elapsed)
                    firsts[n].append(first)
    result = {"bench": "three-models", "models": sources, "new_tokens": new_tokens,
              "rounds": rounds, "enforce_eager": setup.enforce_eager,
              "decode_steps": setup.decode_steps, "per_model": {}}
    for n, s in zip(names, sources, strict=True):
        arch = resolve_source(s).arch
        ms = 1e3 * statistics.median(times[n])
        step_bytes = decode_step_bytes(arch, DTYPE, [len(ids[n]) + new_tokens // 2])
        floor_ms = 1e3 * new_tokens * step_bytes / setup.bandwidth
        result["per_model"][s] = {"ms_per_reply": ms, "ms_per_token": ms / new_tokens,
                                  "prompt_tokens": len(ids[n]),
                                  "ms_first_token": 1e3 * statistics.median(firsts[n]),
                                  "roofline_ms_per_reply": floor_ms,
                                  "pct_roofline": 100 * floor_ms / ms}
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    if baseline:
        for n, s in zip(names, sources, strict=True):
            arch = resolve_source(s).arch
            hf = build_hf_model(n, arch, torch.bfloat16, setup.device)
            prompt = torch.tensor([ids[n]], device=setup.device)
            secs = hf_generate_seconds(hf, prompt, new_tokens, repeats=3)
            entry = result["per_model"][s]
            entry["hf_ms_per_reply"] = 1e3 * secs
            entry["speedup_vs_hf"] = entry["hf_ms_per_reply"] / entry["ms_per_reply"]
            del hf
            gc.collect()
            torch.cuda.empty_cache()
    return result
