"""Where a short reply's first token goes in the three-models scenario, on the GPU machine:
host phases (timers wrapped around the engine's and the graph runner's methods) and the GPU time
of the prompt replay (CUDA events), for the first model's prompt step after the other models ran.

    PYTHONPATH=src python3 bench/gpu_first_token.py [ROUNDS]

Builds the three-models hive of ``modelhive bench three-models`` (TinyLlama-1.1B, Qwen2.5-3B,
Yi-6B presets, "Hello", 10 greedy tokens each, one after another) and prints, for the first
model's last two rounds, every wrapped call's entry and exit in microseconds from
``add_request`` up to the end of the engine step that returned the first token, then the GPU
time of that step's replay and of the reply's next one-step replay (a one-row decode; the
multi-step replays are not timed).
"""

from __future__ import annotations

import sys
import time

import torch

from modelhive.bench.offline import Setup, make_engine, preset_name
from modelhive.cli.bench import THREE
from modelhive.config import ModelSpec
from modelhive.engine.engine import Engine
from modelhive.engine.scheduler import Scheduler
from modelhive.runner.cuda_graphs import DecodeGraphs
from modelhive.runner.decode_ahead import DecodeAhead
from modelhive.runner.model_runner import ModelRunner
from modelhive.sampling_params import SamplingParams

marks: list[tuple[str, float]] = []
replays: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []


def wrap(cls, name: str, label: str) -> None:
    inner = getattr(cls, name)

    def timed(*args, **kwargs):
        marks.append((label + "<", time.perf_counter()))
        out = inner(*args, **kwargs)
        marks.append((label + ">", time.perf_counter()))
        return out

    setattr(cls, name, timed)


def wrap_replay() -> None:
    inner = DecodeGraphs.replay

    def replay(self, rows, input_ids=None):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = inner(self, rows, input_ids)
        end.record()
        replays.append((start, end, len(rows)))
        return out

    DecodeGraphs.replay = replay


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    names = [preset_name(s) for s in THREE]
    specs = [ModelSpec(name=n, source=s, dtype="bfloat16", max_model_len=64, max_num_seqs=4,
                       max_num_batched_tokens=256) for n, s in zip(names, THREE, strict=True)]
    engine = make_engine(specs, {n: 256 for n in names}, Setup(enforce_eager=False, bandwidth=1.0))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    ids = {n: engine.tokenize(n, "Hello") for n in names}
    wrap_replay()
    for cls, name, label in ((Scheduler, "schedule", "schedule"), (ModelRunner, "execute", "execute"),
                             (DecodeGraphs, "_stage", "stage"), (DecodeGraphs, "replay", "replay"),
                             (DecodeGraphs, "replay_steps", "replay_steps"),
                             (DecodeAhead, "finish", "finish"), (DecodeAhead, "_launch", "launch"),
                             (Engine, "_apply", "apply")):
        wrap(cls, name, label)
    for r in range(rounds):
        for n in names:
            marks.clear()
            replays.clear()
            t0 = time.perf_counter()
            engine.add_request(n, ids[n], params)
            marks.append(("added", time.perf_counter()))
            engine.step()
            first = time.perf_counter()
            while engine.has_work:
                engine.step()
            torch.cuda.synchronize()
            if r < rounds - 2 or n != names[0]:
                continue
            print(f"--- round {r}, {n} ({len(ids[n])} prompt tokens): first token "
                  f"{1e3 * (first - t0):.3f} ms, reply {1e3 * (time.perf_counter() - t0):.3f} ms")
            prev = t0
            for label, t in marks:
                if t > first:
                    break
                print(f"  {label:14s} +{1e6 * (t - t0):7.0f} us  ({1e6 * (t - prev):5.0f})")
                prev = t
            for start, end, rows in replays[:2]:
                print(f"  GPU replay of {rows} rows: {1e3 * start.elapsed_time(end):.0f} us")


if __name__ == "__main__":
    main()
