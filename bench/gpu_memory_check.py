"""Planned vs measured device memory for a config on the GPU (default: the three-model example).

    PYTHONPATH=src python3 bench/gpu_memory_check.py [CONFIG.yaml] [--json OUT.json]

Steps, each measured (``engine/memory_report.py``):
  1. CUDA context alone (NVML per-process bytes after the first tensor).
  2. ``build_engine``: per model the allocator growth of its load (weights) and the peak of a dry
     step at its token budget (activation); the KV pool.
  3. CUDA graphs, decode and prefill (``enforce_eager: false`` and ``runner/cuda_graphs.py``
     present), one model after another into the one shared graph pool: reserved and NVML growth
     per model.
  4. Traffic: every model at its token budget with ``max_num_seqs`` sampling sequences, decoding
     (graph replays), then the process is read again (steady state).
  5. Each model's worst step once more (the allocator cache as at full load), then the last
     reading: ``measure_memory`` (what ``modelhive ps`` shows).
Prints plan vs measured per model and per term, and exits 1 when a term is off by more than
3 % of its plan (at least 0.1 % of the budget, so terms of a few MiB are judged against bytes
that matter; activation, graphs and overhead are upper bounds, so only overshoot fails there;
weights, KV pool, each model's weights + activation and the process against the budget fail
both ways; graphs are judged as one hive term, since all models share one graph pool).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from modelhive.config import load_config
from modelhive.engine.hive import build_engine
from modelhive.engine.memory_report import (
    compare,
    dry_step_batch,
    measure_memory,
    nvml_process_bytes,
)
from modelhive.sampling_params import SamplingParams

MiB = 2**20
TOLERANCE = 0.03
FLOOR_OF_BUDGET = 0.001
#: terms the plan bounds from above: measuring less is fine (the process total still is checked
#: both ways)
UPPER_BOUNDS = {"activation", "graphs", "overhead"}


def reading(dev: torch.device) -> dict[str, int | None]:
    torch.cuda.synchronize(dev)
    return {"allocated": torch.cuda.memory_allocated(dev),
            "reserved": torch.cuda.memory_reserved(dev), "nvml": nvml_process_bytes(dev)}


def fmt(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def pct(measured: int | None, planned: int) -> str:
    if measured is None or not planned:
        return "-"
    return f"{100 * (measured - planned) / planned:+.2f} %"


def graph_pool(dev: torch.device) -> tuple[int, int]:
    """(reserved, allocated) bytes of the caching-allocator segments owned by graph pools."""
    reserved = allocated = 0
    for seg in torch.cuda.memory_snapshot():
        if seg.get("device") == dev.index and tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0):
            reserved += seg["total_size"]
            allocated += seg["allocated_size"]
    return reserved, allocated


def capture_graphs(engine, dev: torch.device) -> dict[str, dict[str, int | None]]:
    """Capture decode graphs (and the multi-step ones) model by model into one shared pool (as
    ``capture_cuda_graphs`` does); per model: growth of the graph pool, of allocations outside it (the capture stream's
    cuBLAS workspace) and of the non-torch memory (graph executables, kernels loaded)."""
    try:
        from modelhive.runner import cuda_graphs
    except ImportError:
        return {}
    from modelhive.planner.estimates import DECODE_STEPS

    pool = torch.cuda.graph_pool_handle()
    engine.scheduler.lookahead = cuda_graphs.decode_lookahead(DECODE_STEPS)
    grown = {}
    for name, loaded in engine.models.items():
        before, pool_before = reading(dev), graph_pool(dev)
        t0 = time.perf_counter()
        lim = loaded.limits
        loaded.runner.enable_cuda_graphs(lim.max_num_seqs, lim.max_model_len, pool,
                                         lim.max_num_batched_tokens, DECODE_STEPS)
        torch.cuda.empty_cache()  # as capture_cuda_graphs: the warm-up runs' cached blocks
        after, pool_after = reading(dev), graph_pool(dev)
        non_torch = None
        if after["nvml"] is not None and before["nvml"] is not None:
            non_torch = (after["nvml"] - after["reserved"]) - (before["nvml"] - before["reserved"])
        outside = (after["allocated"] - before["allocated"]) - (pool_after[1] - pool_before[1])
        pool_growth = pool_after[0] - pool_before[0]
        grown[name] = {"pool": pool_growth, "outside_pool": outside, "non_torch": non_torch,
                       "total": pool_growth + outside + (non_torch or 0),
                       "captures": len(loaded.runner.decode_graphs.graphs) + len(
                           loaded.runner.decode_graphs.multi_graphs) + len(
                           getattr(loaded.runner.prefill_graphs, "graphs", ())),
                       "seconds": round(time.perf_counter() - t0, 2)}
    return grown


def worst_steps(engine) -> None:
    """Each model's worst step (the dry step of ``build_engine``) once more: the allocator cache
    then holds what steady state at full load holds."""
    for name, loaded in engine.models.items():
        lim = loaded.limits
        batch = dry_step_batch(name, lim.max_num_batched_tokens, lim.max_num_seqs,
                               lim.max_model_len, lim.layout.tokens_per_block,
                               engine.pool.num_blocks, loaded.runner.model.arch.vocab_size)
        loaded.runner.execute(batch)
    torch.cuda.synchronize()


def traffic(engine, dev: torch.device) -> dict[str, float]:
    """Every model at its token budget: max_num_seqs prompts of T/S tokens, 24 new tokens each."""
    params = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    n = 0
    t0 = time.perf_counter()
    for name, loaded in engine.models.items():
        lim = loaded.limits
        plen = max(1, min(lim.max_num_batched_tokens // lim.max_num_seqs, lim.max_model_len - 32))
        vocab = loaded.runner.model.arch.vocab_size
        for i in range(lim.max_num_seqs):
            engine.add_request(name, [1 + (i * 7 + j) % (vocab - 1) for j in range(plen)], params)
            n += 1
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    torch.cuda.synchronize(dev)
    engine.check_integrity()
    return {"requests": n, "steps": steps, "seconds": round(time.perf_counter() - t0, 2),
            "peak_above_base": torch.cuda.max_memory_allocated(dev) - base}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="examples/three-models-32gb.yaml")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    config = load_config(args.config)
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.zeros(1, device=dev)
    context = reading(dev)
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}; config {args.config}", flush=True)

    t0 = time.perf_counter()
    engine = build_engine(config.models, "cuda", config.memory, config.policy,
                          config.enforce_eager, capture_graphs=False)  # captured below, measured
    built = reading(dev)
    build_s = time.perf_counter() - t0
    at_start = measure_memory(engine).terms()  # what `modelhive ps` shows right after loading
    graphs = {} if config.enforce_eager else capture_graphs(engine, dev)
    after_graphs = reading(dev)
    load = traffic(engine, dev)
    after_traffic = reading(dev)
    worst_steps(engine)
    steady = reading(dev)
    measured = measure_memory(engine)
    plan = engine.plan
    budget = plan.budget_bytes

    print(f"build {build_s:.1f} s; graphs captured: {sum(g['captures'] for g in graphs.values())}"
          f"; traffic {load['requests']} requests, {load['steps']} steps, {load['seconds']} s")
    print(f"CUDA context alone: NVML {fmt(context['nvml'])} MiB (torch reserved "
          f"{fmt(context['reserved'])} MiB)")
    for label, r in (("after build", built), ("after graphs", after_graphs),
                     ("after traffic", after_traffic), ("worst steps", steady)):
        non_torch = None if r["nvml"] is None else r["nvml"] - r["reserved"]
        print(f"{label:14s} allocated {fmt(r['allocated'])}  reserved {fmt(r['reserved'])}  "
              f"NVML {fmt(r['nvml'])}  NVML-reserved {fmt(non_torch)} MiB")
    print(f"traffic peak above steady allocation: {fmt(load['peak_above_base'])} MiB")
    print("right after build_engine (no graphs yet): " + ", ".join(
        f"{t} {fmt(v)}" for t, v in at_start.items()) + f" MiB; process vs budget "
        f"{pct(at_start['process'], plan.budget_bytes)}")

    failures = []

    def check(label: str, term: str, planned: int, got: int | None) -> None:
        if got is None:
            return
        allowed = max(TOLERANCE * planned, FLOOR_OF_BUDGET * budget)
        over = got - planned
        if (over > allowed) or (term not in UPPER_BOUNDS and -over > allowed):
            failures.append(f"{label} {term}: measured {fmt(got)} MiB vs planned {fmt(planned)} MiB")

    print("\nper model (MiB)")
    print(f"{'MODEL':16s} {'WEIGHTS plan':>13s} {'measured':>10s} {'diff':>9s} "
          f"{'ACT plan':>9s} {'measured':>9s} {'GRAPHS plan':>12s} {'measured':>9s} "
          f"{'W+ACT plan':>11s} {'measured':>10s} {'diff':>9s}")
    rows = {}
    for mp in plan.models:
        mm = measured.model(mp.name)
        g = graphs.get(mp.name, {}).get("total")
        # a model's own memory: weights + its step's peak. Graphs are judged as one hive term:
        # the pool is shared, and the first model captured also pays the once-per-process part
        # (decode kernels loaded, graph infrastructure), so per-model graph growth is order-bound
        total_plan = mp.weight_bytes + mp.activation_bytes
        total_got = mm.weight_bytes + (mm.activation_bytes or 0)
        rows[mp.name] = {"planned": {"weights": mp.weight_bytes, "activation": mp.activation_bytes,
                                     "graphs": mp.graph_bytes, "total": total_plan},
                         "measured": {"weights": mm.weight_bytes, "params": mm.param_bytes,
                                      "activation": mm.activation_bytes, "graphs": g,
                                      "total": total_got}}
        print(f"{mp.name:16s} {fmt(mp.weight_bytes):>13s} {fmt(mm.weight_bytes):>10s} "
              f"{pct(mm.weight_bytes, mp.weight_bytes):>9s} {fmt(mp.activation_bytes):>9s} "
              f"{fmt(mm.activation_bytes):>9s} {fmt(mp.graph_bytes):>12s} {fmt(g):>9s} "
              f"{fmt(total_plan):>11s} {fmt(total_got):>10s} {pct(total_got, total_plan):>9s}")
        check(mp.name, "weights", mp.weight_bytes, mm.weight_bytes)
        check(mp.name, "total", total_plan, total_got)

    print("\nterms (MiB), process read after traffic and each model's worst step")
    print(f"{'TERM':12s} {'planned':>10s} {'measured':>10s} {'diff':>9s}")
    terms = {}
    for c in compare(plan, measured):
        terms[c.term] = {"planned": c.planned, "measured": c.measured}
        label = "process/budget" if c.term == "process" else c.term
        print(f"{label:14s} {fmt(c.planned):>10s} {fmt(c.measured):>10s} "
              f"{pct(c.measured, c.planned):>9s}")
        check("hive", c.term, c.planned, c.measured)
    pool_reserved, pool_allocated = graph_pool(dev)
    print(f"torch reserved {fmt(measured.torch_reserved_bytes)} MiB, allocated "
          f"{fmt(measured.torch_allocated_bytes)} MiB, NVML process "
          f"{fmt(measured.nvml_process_bytes)} MiB, graph pool {fmt(pool_reserved)} MiB "
          f"({fmt(pool_allocated)} allocated)")
    for name, g in graphs.items():
        print(f"graphs {name}: {g['captures']} captures in {g['seconds']} s, pool "
              f"{fmt(g['pool'])}, outside pool {fmt(g['outside_pool'])}, non-torch "
              f"{fmt(g['non_torch'])} MiB")

    if args.json or os.environ.get("OUT"):
        path = args.json or os.path.join(os.environ["OUT"], "gpu_memory.json")
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                       "config": args.config, "context": context, "after_build": built,
                       "after_graphs": after_graphs, "after_traffic": after_traffic,
                       "worst_steps": steady, "at_start": at_start, "graphs": graphs,
                       "traffic": load, "models": rows, "terms": terms,
                       "failures": failures}, f, indent=1)
    if failures:
        print("\nOFF BY MORE THAN 3 %:\n  " + "\n  ".join(failures))
        return 1
    print("\nwithin the plan: weights, KV pool, weights + activation per model and the process "
          "within 3 % either way; activation, graphs and overhead (upper bounds) at most 3 % "
          "over, however far under")
    return 0


if __name__ == "__main__":
    sys.exit(main())
