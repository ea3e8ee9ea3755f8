"""What each kernel of a step adds to the step's time on the GPU machine (PDL overlaps kernels,
so per-kernel durations overstate; this counts the time each kernel's end moves the step's end).

    PYTHONPATH=src python3 bench/gpu_timeline.py decode PRESET [BATCH] [CONTEXT]
    PYTHONPATH=src python3 bench/gpu_timeline.py prefill PRESET [SEQS] [PROMPT_LEN]
    PYTHONPATH=src python3 bench/gpu_timeline.py engine PRESET [BATCH] [CONTEXT]

``decode``: one captured graph replay of BATCH rows at CONTEXT keys per sequence; ``prefill``:
one eager step of SEQS prompts of PROMPT_LEN tokens (the chunked-prefill shape of the throughput
workload), then a host profile (cProfile) of such steps; ``engine``: consecutive greedy
``engine.step()`` calls of a BATCH-row decode (decode-ahead), so the work between graph replays
(input copies, the token argmax and copy) shows beside the graph's kernels. Prints, per kernel or
copy name: count, summed duration, summed marginal time (``end_i`` minus the latest end before
it, at least 0) and the step's span, from a CUPTI trace of 5 steps (20 engine steps).
"""

from __future__ import annotations

import collections
import cProfile
import json
import os
import pstats
import random
import sys
import tempfile

import torch

from modelhive import ModelSpec, SamplingParams
from modelhive.bench.offline import Setup, make_engine

mode = sys.argv[1] if len(sys.argv) > 1 else "decode"
preset = sys.argv[2] if len(sys.argv) > 2 else "tinyllama-1.1b"
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 1
length = int(sys.argv[4]) if len(sys.argv) > 4 else 192
REPEAT = 20 if mode == "engine" else 5

model_len = length + 64
tokens = batch * length if mode == "prefill" else max(2048, batch)
spec = ModelSpec(name="m", source=f"preset:{preset}", dtype="bfloat16", max_model_len=model_len,
                 max_num_seqs=batch, max_num_batched_tokens=max(tokens, 2048))
engine = make_engine([spec], {"m": batch * model_len}, Setup(enforce_eager=False, bandwidth=1.0))
runner = engine.models["m"].runner
vocab = runner.model.arch.vocab_size
rng = random.Random(0)


def add_requests() -> None:
    for _ in range(batch):
        engine.add_request("m", [rng.randrange(300, vocab) for _ in range(length)],
                           SamplingParams(max_tokens=8 if mode != "engine" else 60,
                                          temperature=0.0, ignore_eos=True))


if mode == "engine":
    add_requests()
    while any(len(s.output_token_ids) < 4 for s in engine.scheduler.queues["m"].running) \
            or engine.scheduler.num_waiting("m"):
        engine.step()

    def step() -> None:
        engine.step()
elif mode == "decode":
    add_requests()
    while any(not s.output_token_ids for s in engine.scheduler.queues["m"].running) \
            or engine.scheduler.num_waiting("m"):
        engine.step()
    engine.step()
    torch.cuda.synchronize()
    graphs = runner.decode_graphs
    graph = graphs.graphs[next(b for b in graphs.batch_sizes if b >= batch)][0]

    def step() -> None:
        graph.replay()
else:
    # the scheduler's first step is one eager forward over every prompt: time that forward
    from modelhive.runner.attn_metadata import SeqChunk
    from modelhive.runner.cuda_graphs import stage_eager_inputs

    T = runner.layout.tokens_per_block
    add_requests()
    engine.step()  # allocates the blocks and writes the prompts' keys once
    seqs = list(engine.scheduler.queues["m"].running)
    chunks = [SeqChunk(0, length, tuple(s.block_table)) for s in seqs]
    flat = [rng.randrange(300, vocab) for _ in range(batch * length)]

    @torch.inference_mode()
    def step() -> None:
        meta, input_ids = stage_eager_inputs(chunks, flat, T, runner.device)
        hidden = runner.model(input_ids, meta, runner.kv_caches)
        runner.model.compute_logits(hidden[meta.logits_indices()])

for _ in range(3):
    step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(REPEAT):
        step()
        if mode != "engine":  # engine steps overlap by design (decode-ahead)
            torch.cuda.synchronize()
    torch.cuda.synchronize()
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)
kernels = sorted((e for e in trace["traceEvents"]
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
# every step launches the same kernels in the same order: REPEAT equal runs of the trace
per_step = len(kernels) // REPEAT
steps = [kernels[i * per_step:(i + 1) * per_step] for i in range(REPEAT)]
# per position in the step (steps align): marginal and duration, averaged over the steps
n = len(steps)
index_marg = [0.0] * per_step
index_dur = [0.0] * per_step
spans = []
for s in steps:
    end = s[0]["ts"]
    for i, e in enumerate(s):
        e_end = e["ts"] + e["dur"]
        index_marg[i] += max(0.0, e_end - end) / n
        index_dur[i] += e["dur"] / n
        end = max(end, e_end)
    spans.append(end - s[0]["ts"])
names = [e["name"][:70] for e in steps[0]]
count: dict[str, int] = collections.Counter(names)
dur: dict[str, float] = collections.Counter()
marg: dict[str, float] = collections.Counter()
for name, m, d in zip(names, index_marg, index_dur, strict=True):
    marg[name] += m
    dur[name] += d
print(f"{mode} {preset} batch {batch} length {length}: {n} steps traced, "
      f"{per_step} kernels per step, span median {sorted(spans)[n // 2]:.1f} us")
print(f"{'marginal us':>12} {'duration us':>12} {'count':>6}  kernel")
for name in sorted(marg, key=lambda k: -marg[k]):
    print(f"{marg[name]:12.1f} {dur[name]:12.1f} {count[name]:6d}  {name}")
# a window of consecutive kernels from the middle of the step (a layer and a bit): which
# linear of a layer costs what
mid = per_step // 2
print("kernels", mid - 8, "to", mid + 8, "of the step (marginal / duration us):")
for i in range(max(0, mid - 8), min(per_step, mid + 8)):
    print(f"  {i:4d} {index_marg[i]:8.1f} {index_dur[i]:8.1f}  {names[i][:60]}")
if mode == "prefill":  # eager steps: where the host's time goes (launches, metadata)
    # launch-bound or not: the host's time to queue a step against the GPU's time to run it
    import time

    launch, total, gpu = [], [], []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(REPEAT):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        t1 = time.perf_counter()
        end.synchronize()
        t2 = time.perf_counter()
        launch.append(1e3 * (t1 - t0))
        total.append(1e3 * (t2 - t0))
        gpu.append(start.elapsed_time(end))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"eager step, medians of {REPEAT}: host queues it in {med(launch):.2f} ms, done after "
          f"{med(total):.2f} ms; GPU from first to last kernel {med(gpu):.2f} ms")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(REPEAT):
        step()
    torch.cuda.synchronize()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)
