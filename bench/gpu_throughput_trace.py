"""Where the throughput workload's wall time goes, on the GPU machine: per phase of the run, the
host's time per step (schedule, runner, applying the tokens) and the GPU's busy time (a CUPTI
trace of every kernel and copy), so a phase that leaves the GPU idle shows as host-bound.

    PYTHONPATH=src python3 bench/gpu_throughput_trace.py [PRESET] [NUM_REQUESTS] [DECODE_STEPS]
        [SETTING=VALUE ...]

SETTING=VALUE: a ``SamplingParams`` setting of every request (numbers as numbers), e.g.
``repetition_penalty=1.1`` or ``temperature=0.7 top_p=0.9 logprobs=1``; default greedy.

The workload is ``bench throughput``'s (``offline.throughput_workload``; default
preset:qwen2.5-0.5b, 256 requests); its first pass warms up, the second is traced. Phases: steps
with prompt chunks, then decode steps by running sequences (>= 192, 128-191, 64-127, < 64). A
phase's profiler starts and stops around it (the switch costs a synchronize, outside the phase's
wall time). Prints one line per phase and the kernels that took the most GPU time per phase.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from modelhive.bench.offline import Setup, throughput_workload
from modelhive.bench.roofline import measure_copy_bandwidth
from modelhive.engine.hive import settle_for_serving
from modelhive.planner.estimates import DECODE_STEPS

preset = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-0.5b"
num_requests = int(sys.argv[2]) if len(sys.argv) > 2 else 256
decode_steps = int(sys.argv[3]) if len(sys.argv) > 3 else DECODE_STEPS
sampling = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])}

work = throughput_workload(f"preset:{preset}", Setup(enforce_eager=False,
                                                     bandwidth=measure_copy_bandwidth(),
                                                     decode_steps=decode_steps),
                           num_requests=num_requests, sampling=sampling or None)
engine = work.engine
queues = engine.scheduler.queues[work.name]
runner = engine.models[work.name].runner
work.run()  # warm-up: every kernel variant compiles
settle_for_serving()

# host timers, per step
timing = {"schedule": 0.0, "execute": 0.0}


def timed(obj, attr: str, key: str) -> None:
    inner = getattr(obj, attr)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            timing[key] += time.perf_counter() - t

    setattr(obj, attr, wrapper)


timed(engine.scheduler, "schedule", "schedule")
timed(runner, "execute", "execute")


def phase_of() -> str:
    if queues.waiting or any(s.num_computed < s.num_tokens - 1 for s in queues.running):
        return "prompt"
    n = len(queues.running)
    return ">=192" if n >= 192 else "128-191" if n >= 128 else "64-127" if n >= 64 else "<64"


class Phase:
    def __init__(self, name: str):
        self.name = name
        self.steps = 0
        self.rows = 0
        self.wall = 0.0
        self.host = collections.Counter()
        self.step_s: list[float] = []
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])

    def stop(self) -> None:
        """Stop tracing and read the trace now (a later profiler session replaces it)."""
        self.prof.stop()
        self.result = self.summary()

    def summary(self) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            self.prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
        # what each kernel adds to the busy time: its end past the latest end before it (PDL
        # kernels overlap, so durations overstate); the sum is the union of the intervals
        by_name: dict[str, float] = collections.Counter()
        latest = float("-inf")
        for e in gpu:
            f = e["ts"] + e["dur"]
            by_name[e["name"][:60]] += max(0.0, f - max(e["ts"], latest))
            latest = max(latest, f)
        return {"busy_ms": sum(by_name.values()) / 1e3,
                "top": sorted(by_name.items(), key=lambda kv: -kv[1])[:14]}


phases: dict[str, Phase] = {}
state: dict = {"phase": None, "t": None, "timing": None}


def close_step() -> None:
    """Charge the step that just ran (since the last ``on_step``) to its phase."""
    phase, t = state["phase"], state["t"]
    if phase is None:
        return
    dt = time.perf_counter() - t
    phase.steps += 1
    phase.wall += dt
    phase.step_s.append(dt)
    for k, v in timing.items():
        phase.host[k] += v - state["timing"][k]


def on_step() -> None:
    close_step()
    name = phase_of()
    phase = state["phase"]
    if phase is None or name != phase.name:
        if phase is not None:
            torch.cuda.synchronize()
            phase.stop()
        if name in phases:
            raise SystemExit(f"phase {name} came back: the phases are not in order")
        phase = state["phase"] = phases[name] = Phase(name)
        torch.cuda.synchronize()
        phase.prof.start()
    phase.rows += len(queues.running) + len(queues.waiting)
    state["timing"] = dict(timing)
    state["t"] = time.perf_counter()


generated, _ = work.run(on_step)
close_step()
torch.cuda.synchronize()
state["phase"].stop()
assert generated == sum(work.output_lens)

total_wall = sum(p.wall for p in phases.values())
settings = f" ({sampling})" if sampling else ""
print(f"{preset}, {num_requests} requests{settings}: {generated} tokens, wall {total_wall:.3f} s in "
      f"{sum(p.steps for p in phases.values())} steps ({generated / total_wall:,.0f} tok/s; the "
      f"profiler's own cost is in it)")
print(f"{'phase':>8} {'steps':>6} {'rows':>5} {'wall ms':>9} {'GPU busy':>9} {'busy %':>7} "
      f"{'ms/step':>8} {'sched us':>9} {'runner us':>10} {'rest us':>8}")
for p in phases.values():
    s = p.result
    n = max(1, p.steps)
    sched, execute = p.host["schedule"], p.host["execute"]
    print(f"{p.name:>8} {p.steps:6d} {p.rows / n:5.0f} {1e3 * p.wall:9.1f} {s['busy_ms']:9.1f} "
          f"{100 * s['busy_ms'] / (1e3 * p.wall):6.1f}% {1e3 * statistics.median(p.step_s):8.3f} "
          f"{1e6 * sched / n:9.1f} {1e6 * execute / n:10.1f} "
          f"{1e6 * (p.wall - sched - execute) / n:8.1f}")
for p in phases.values():
    print(f"-- {p.name}: busy time each kernel adds (ms)")
    for k, us in p.result["top"]:
        print(f"   {us / 1e3:9.2f}  {k}")
