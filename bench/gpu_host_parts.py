"""Host time of the graph runner's parts per engine step, on the GPU machine (timers wrapped
around the decode-ahead path's methods; the model runs for real).

    PYTHONPATH=src python3 bench/gpu_host_parts.py PRESET BATCH CONTEXT

Greedy decode of BATCH sequences at about CONTEXT tokens, 100 engine steps after warm-up, with
the serving GC settings. Prints the median engine step and the median host time per step of
``DecodeAhead.take``, ``DecodeGraphs._stage`` (input staging and its copy), ``graph.replay``,
``sampler.choose``, ``DecodeAhead._launch`` (staging + replay + choose + rows), ``finish`` (with
the wait for this step's tokens) and ``ModelRunner.execute``; the rest of the step is the
engine's own host work.
"""

from __future__ import annotations

import collections
import random
import statistics
import sys
import time

from modelhive import ModelSpec, SamplingParams
from modelhive.bench.offline import Setup, make_engine
from modelhive.engine.hive import settle_for_serving
from modelhive.runner import decode_ahead

preset = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-0.5b"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 256
length = int(sys.argv[3]) if len(sys.argv) > 3 else 900
spec = ModelSpec(name="m", source=f"preset:{preset}", dtype="bfloat16",
                 max_model_len=length + 200, max_num_seqs=batch,
                 max_num_batched_tokens=max(2048, batch))
engine = make_engine([spec], {"m": batch * (length + 200)},
                     Setup(enforce_eager=False, bandwidth=1.0))
runner = engine.models["m"].runner
times: dict[str, list[float]] = collections.defaultdict(list)


def timed(label: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times[label].append(time.perf_counter() - start)
        return out
    return wrapper


graphs = runner.decode_graphs
graphs._stage = timed("DecodeGraphs._stage", graphs._stage)
for graph, *_ in graphs.graphs.values():
    graph.replay = timed("graph.replay", graph.replay)
ahead = runner.ahead
ahead.take = timed("DecodeAhead.take", ahead.take)
ahead._launch = timed("DecodeAhead._launch", ahead._launch)
ahead.finish = timed("DecodeAhead.finish (+ wait)", ahead.finish)
decode_ahead.choose = timed("sampler.choose", decode_ahead.choose)
runner.execute = timed("ModelRunner.execute", runner.execute)

rng = random.Random(0)
vocab = runner.model.arch.vocab_size
for _ in range(batch):
    engine.add_request("m", [rng.randrange(300, vocab) for _ in range(length)],
                       SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True))
while any(len(s.output_token_ids) < 4 for s in engine.scheduler.queues["m"].running) \
        or engine.scheduler.num_waiting("m"):
    engine.step()
settle_for_serving()
times.clear()
steps = []
for _ in range(100):
    start = time.perf_counter()
    engine.step()
    steps.append(time.perf_counter() - start)
print(f"{preset} batch {batch} context ~{length}: engine.step median "
      f"{1e6 * statistics.median(steps):.0f} us")
for label, values in times.items():
    print(f"  {label:30s} median {1e6 * statistics.median(values):7.1f} us  "
          f"x{len(values) / len(steps):.1f} per step")
