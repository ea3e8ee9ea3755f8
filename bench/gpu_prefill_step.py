"""Time to the first token of one long prompt, prefill graph against the eager forward, on the GPU
machine: the same engine and weights, one request of PROMPT_LEN random tokens (max_tokens 1, so
its prompt step is its whole life), ``engine.step()`` timed on the host until it finishes, the
median of 10 per mode; eager = the runner's prefill graphs switched off for the run.

    PYTHONPATH=src python3 bench/gpu_prefill_step.py [PRESET] [PROMPT_LEN ...]

Defaults: preset:qwen2.5-0.5b, prompts of 300, 1000, 2000, 4000 and 8000 tokens, with the
throughput bench's limits (256 sequences, 8,192 tokens a step: prefill graphs of 512-8,192
tokens).
"""

from __future__ import annotations

import random
import statistics
import sys
import time

from modelhive import ModelSpec, SamplingParams
from modelhive.bench.offline import Setup, make_engine

preset = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-0.5b"
lengths = [int(a) for a in sys.argv[2:]] or [300, 1000, 2000, 4000, 8000]
REPEAT = 10

spec = ModelSpec(name="m", source=f"preset:{preset}", dtype="bfloat16",
                 max_model_len=max(lengths) + 64, max_num_seqs=256, max_num_batched_tokens=8192)
engine = make_engine([spec], {"m": 4 * (max(lengths) + 64)},
                     Setup(enforce_eager=False, bandwidth=1.0))
runner = engine.models["m"].runner
graphs = runner.prefill_graphs
vocab = runner.model.arch.vocab_size
rng = random.Random(0)
once = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def first_token_ms(length: int) -> float:
    engine.add_request("m", [rng.randrange(300, vocab) for _ in range(length)], once)
    start = time.perf_counter()
    while engine.has_work:
        engine.step()
    return 1e3 * (time.perf_counter() - start)


print(f"preset:{preset}: prefill graphs of {graphs.sizes if graphs else []} tokens")
print(f"{'prompt':>7} {'graph ms':>9} {'eager ms':>9} {'eager/graph':>12}")
for n in lengths:
    times = {}
    for mode in ("graph", "eager", "graph", "eager"):  # alternated, warm-up first
        runner.prefill_graphs = graphs if mode == "graph" else None
        first_token_ms(n)
        times.setdefault(mode, []).extend(first_token_ms(n) for _ in range(REPEAT // 2))
    g, e = statistics.median(times["graph"]), statistics.median(times["eager"])
    print(f"{n:7d} {g:9.2f} {e:9.2f} {e / g:11.2f}x")
runner.prefill_graphs = graphs
