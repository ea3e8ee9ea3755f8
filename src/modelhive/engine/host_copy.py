"""Host values to the device without waiting for it: pinned memory and a non-blocking copy,
queued behind the device's work (a copy from pageable memory waits for every kernel queued
before it, i.e. for the step in flight). Used by the sampler and its penalties."""

from __future__ import annotations

import numpy as np
import torch


def device_index(idx: list[int], device: torch.device) -> torch.Tensor:
    """``idx`` as an int64 tensor on ``device`` without waiting for the device: on CUDA,
    ``torch.tensor(idx, device=...)`` copies from pageable memory and so waits for every kernel
    queued before it (the step in flight); a pinned copy is queued behind them instead."""
    return host_values(idx, torch.int64, device)


def host_values(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list, or a numpy array) as a tensor on ``device``, queued behind the
    device's work (pinned, non-blocking) instead of waiting for it."""
    if isinstance(values, np.ndarray):
        host = torch.from_numpy(values)
        if device.type == "cuda":
            host = host.pin_memory()
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)
