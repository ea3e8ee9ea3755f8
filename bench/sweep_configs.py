"""What the tile sweeps share (``gpu_attention_sweep.py``, ``gpu_prefill_sweep.py``): time each
config, skip the ones that do not compile or run, compare each output with the default's."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def rank_configs(run: Callable[[dict], tuple[float, torch.Tensor]], configs: Iterable[dict],
                 base_out: torch.Tensor) -> list[tuple[float, dict, float]]:
    """``(us, config, max abs difference from base_out)`` of every config that ran, fastest
    first; ``run(config)`` returns (us, output)."""
    results = []
    for cfg in configs:
        try:
            t, out = run(cfg)
        except Exception as exc:  # out of resources: skip the config
            print(f"  {cfg}: {type(exc).__name__}")
            continue
        results.append((t, cfg, (out.float() - base_out.float()).abs().max().item()))
    results.sort(key=lambda r: r[0])
    return results
