"""The memory roofline: bytes a decode step must read, and the copy bandwidth measured here.

A decode step reads every weight once (the embedding table only for the batch's rows, unless it
is tied to the output projection, which reads it all) plus the K and V of every cached token of
every sequence in the batch. Step time >= those bytes / bandwidth; the bandwidth is a large
device-to-device copy measured in the same process, counting bytes read plus bytes written.
"""

from __future__ import annotations

import math

import torch

from modelhive.models.arch import DTYPE_BYTES, ArchConfig


def measure_copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 1 << 30,
                           repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy (read + write), median of ``repeats``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    times.sort()
    return 2 * nbytes / times[len(times) // 2]


def weight_bytes_read(arch: ArchConfig, dtype: str, batch: int) -> int:
    """Weight bytes one decode step of ``batch`` sequences reads."""
    elem = DTYPE_BYTES[dtype]
    total = 0
    for name, shape in arch.param_shapes().items():
        numel = math.prod(shape)
        if name == "model.embed_tokens.weight" and not arch.tie_word_embeddings:
            numel = batch * shape[1]  # only the looked-up rows
        total += numel * elem
    return total


def decode_step_bytes(arch: ArchConfig, dtype: str, context_lens: list[int]) -> int:
    """Weights + the KV of every cached token of each sequence (``context_lens``)."""
    kv = arch.kv_bytes_per_token(dtype) * sum(context_lens)
    return weight_bytes_read(arch, dtype, len(context_lens)) + kv
