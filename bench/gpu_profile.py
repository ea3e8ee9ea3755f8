"""Where a decode step's time goes on the GPU machine: graph replay (device time) vs host time.

    PYTHONPATH=src python3 bench/gpu_profile.py [preset] [batch] [prompt_len]

Prints the median engine step, the graph replay time (CUDA events), an eager decode step, and
the top host functions by own time (cProfile) over a generation.
"""

from __future__ import annotations

import cProfile
import pstats
import random
import statistics
import sys
import time

import torch

from modelhive import ModelSpec, SamplingParams
from modelhive.bench.offline import Setup, _graph_replay_ms, make_engine

preset = sys.argv[1] if len(sys.argv) > 1 else "tinyllama-1.1b"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
prompt_len = int(sys.argv[3]) if len(sys.argv) > 3 else 128
model_len = prompt_len + 272
spec = ModelSpec(name="m", source=f"preset:{preset}", dtype="bfloat16", max_model_len=model_len,
                 max_num_seqs=batch, max_num_batched_tokens=max(2048, min(8192, prompt_len * batch)))
engine = make_engine([spec], {"m": batch * model_len}, Setup(enforce_eager=False, bandwidth=1.0))
rng = random.Random(0)
vocab = engine.models["m"].runner.model.arch.vocab_size


def generate(new_tokens: int, profile: cProfile.Profile | None = None) -> list[float]:
    for _ in range(batch):
        engine.add_request("m", [rng.randrange(300, vocab) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    while any(not s.output_token_ids for s in engine.scheduler.queues["m"].running) \
            or engine.scheduler.num_waiting("m"):
        engine.step()  # prefill (chunked)
    times = []
    if profile:
        profile.enable()
    while engine.has_work:
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    if profile:
        profile.disable()
    return times


generate(8)
steps = generate(64)
print(f"{preset} b={batch}: engine decode step median {1e3 * statistics.median(steps):.3f} ms")
print(f"graph replay {_graph_replay_ms(engine, 'm', batch):.3f} ms")
runner = engine.models["m"].runner
graphs, runner.decode_graphs = runner.decode_graphs, None
eager = generate(16)
print(f"eager decode step median {1e3 * statistics.median(eager):.3f} ms")
runner.decode_graphs = graphs
# device time per kernel inside one decode graph replay (CUPTI sees kernels of graph replays)
graph = graphs.graphs[next(b for b in graphs.batch_sizes if b >= batch)][0]
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as kp:
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
events = [e for e in kp.key_averages() if e.device_time_total > 0]
events.sort(key=lambda e: e.device_time_total, reverse=True)
total = sum(e.device_time_total for e in events) / 10
print(f"kernels per replay: {sum(e.count for e in events) / 10:.0f}, device time {total:.1f} us")
for e in events[:14]:
    print(f"  {e.device_time_total / 10:8.1f} us  x{e.count / 10:5.1f}  {e.key[:90]}")
prof = cProfile.Profile()
generate(64, prof)
pstats.Stats(prof).sort_stats("tottime").print_stats(22)
torch.cuda.synchronize()
