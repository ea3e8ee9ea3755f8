"""Time the sampler alone: ``choose`` (what a decode step launched ahead calls) and ``sample``
(what the host reads) on random logits, per setting, at a few row counts.

    PYTHONPATH=src python3 bench/sampler_step.py --device cuda --rows 1 32 256 --vocab 151936

Logits are ``randn * --scale``: 1 is a flat row (top-p 0.9 keeps most of the vocabulary, the
Triton draw's worst case: its threshold search takes many passes), 4 is closer to a language
model's peaked rows. ``MODELHIVE_SAMPLER_KERNEL=0`` times the torch path on CUDA instead of
``kernels/triton/sampling.py``. Prints ms per call (host time until the result is on the host; ``choose`` also alone, without
waiting for the device, which is what the host pays when the step runs ahead). Run with
``PYTHONPATH`` at another tree to compare (the API is the same since session 7).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from modelhive.engine.sampler import choose, sample
from modelhive.engine.sequence import ScheduledSeq
from modelhive.sampling_params import SamplingParams

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=1.0),
    "top_p": dict(temperature=0.7, top_p=0.9),
    "top_k+min_p": dict(temperature=0.7, top_k=50, min_p=0.05),
    "top_k+top_p": dict(temperature=0.7, top_k=20, top_p=0.8),  # Qwen2.5's generation config
    "seeded": dict(temperature=0.7, seed=1),
    "penalties": dict(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.2),
    "logprobs": dict(temperature=0.7, logprobs=5),
    "greedy+lp1": dict(temperature=0.0, logprobs=1),
}


def items(setting: dict, rows: int, history: int) -> list[ScheduledSeq]:
    params = SamplingParams(**setting)
    # an int64 array, as the scheduler passes (``Sequence.history``)
    hist = np.arange(3, 3 + history) if params.repetition_penalty != 1.0 else ()
    return [ScheduledSeq(f"s{i}", (1,), 0, (0,), True, params, 5, hist, history // 2)
            for i in range(rows)]


def timed(fn, device, repeat: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--history", type=int, default=600, help="tokens of a penalised row")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--scale", type=float, default=1.0, help="logits = randn * scale")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = ap.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator()  # the runner's: on the host
    gen.manual_seed(0)
    print(f"device {device} vocab {args.vocab} scale {args.scale}; ms per call "
          f"(median of {args.repeat})")
    print(f"{'setting':<14}{'rows':>6}{'choose, no wait':>17}{'choose':>10}{'sample':>10}")
    for name in args.settings:
        setting = SETTINGS[name]
        for rows in args.rows:
            logits = torch.randn(rows, args.vocab, device=device) * args.scale
            batch = items(setting, rows, args.history)
            def run_choose(logits=logits, batch=batch):
                return choose(logits, batch, gen)

            def run_sample(logits=logits, batch=batch):
                return sample(logits, batch, gen)

            no_wait = timed(run_choose, torch.device("cpu"), args.repeat)
            waited = timed(run_choose, device, args.repeat)
            full = timed(run_sample, device, args.repeat)
            print(f"{name:<14}{rows:>6}{no_wait:>17.3f}{waited:>10.3f}{full:>10.3f}")


if __name__ == "__main__":
    main()
