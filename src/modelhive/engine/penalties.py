"""Repetition, frequency and presence penalties on a step's logits (``penalised``), the first
stage of the sampler (``engine/sampler.py``).

Each row's history (prompt + output tokens) comes from its ``Sequence`` as an int64 array kept
incrementally (``Sequence.history``); tokens a step launched ahead has produced but the host has
not seen yet come as ``pending`` device tokens (``runner/decode_ahead.py``).

On CUDA one Triton kernel applies them (``kernels/triton/penalties.py``); the torch code here
(``_penalise``) is its reference and the CPU's path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from modelhive.engine.host_copy import host_values
from modelhive.engine.sequence import ScheduledSeq
from modelhive.kernels import ops
from modelhive.planner import estimates


def penalised(logits: torch.Tensor, items: Sequence[ScheduledSeq],
              pending: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 copy of ``logits`` ``[rows, vocab]`` with each row's penalties applied:
    repetition (every token seen, prompt included), then frequency and presence (generated
    tokens only), for the rows with a history. ``pending``: ``[rows, k]`` tokens on the device
    that each row generated past its ``history`` (a step launched ahead of the host,
    ``runner/decode_ahead.py``), counted as generated. Ids the logits do not have are ignored.

    The host concatenates the rows' histories (numpy views the scheduler keeps,
    ``Sequence.history``) straight into pinned memory from torch's caching host allocator
    (a fresh numpy array of that size page-faults: two of them took 1.5 ms a step at 256 rows
    of 800 tokens on this repository's CPU) and sends them with a small table per row, in
    groups of rows that hold at most ``estimates.penalty_group_entries`` history entries (or one
    longer history), which bounds the memory the plan reserves for them
    (``estimates.penalty_bytes``). On CUDA the kernel takes a group in one launch
    (``ops.penalty_kernel``); elsewhere, and with ``MODELHIVE_SAMPLER_KERNEL=0``, ``_penalise``."""
    vocab = logits.shape[1]
    x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    rows = [r for r, it in enumerate(items) if len(it.history)]
    if not rows:
        return x
    parts = [np.asarray(items[r].history, dtype=np.int64) for r in rows]
    n_prompt = [items[r].num_prompt_tokens for r in rows]
    ids = _staged(parts, x.device)
    ids_np = ids.numpy()
    # one pass for both ends: a negative id reads as a huge unsigned one
    if len(ids_np) and ids_np.view(np.uint64).max() >= vocab:  # rare: drop those ids
        keep = [(h >= 0) & (h < vocab) for h in parts]
        n_prompt = [int(np.count_nonzero(k[:n])) for k, n in zip(keep, n_prompt, strict=True)]
        parts = [h[k] for h, k in zip(parts, keep, strict=True)]
        ids = _staged(parts, x.device)
    kernel = ops.penalty_kernel(logits) if estimates.SAMPLER_KERNEL else None
    limit = estimates.penalty_group_entries(kernel is not None)
    group: list[tuple[int, int, int]] = []  # (row, history length, prompt tokens)
    start = entries = 0
    for row in zip(rows, map(len, parts), n_prompt, strict=True):
        if group and entries + row[1] > limit:
            _group(logits, x, items, group, ids[start:start + entries], pending, kernel)
            group, start, entries = [], start + entries, 0
        group.append(row)
        entries += row[1]
    _group(logits, x, items, group, ids[start:start + entries], pending, kernel)
    return x


def _staged(parts: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """``parts`` end to end in one int64 host tensor, pinned for a copy to a CUDA device."""
    total = sum(len(h) for h in parts)
    host = torch.empty(total, dtype=torch.int64, pin_memory=device.type == "cuda")
    np.concatenate(parts, out=host.numpy())
    return host


def _group(logits: torch.Tensor, x: torch.Tensor, items: Sequence[ScheduledSeq],
           group: list[tuple[int, int, int]], ids: torch.Tensor, pending: torch.Tensor | None,
           kernel) -> None:
    """The penalties of one group of rows (row, history length, prompt tokens), whose
    histories ``ids`` holds end to end on the host, written into ``x``: the group's table
    (``kernels/triton/penalties.INT_COLUMNS``, ``FLOAT_COLUMNS``) goes to the device in one
    copy, the ints then the floats' bits as int64, and ``kernel`` or ``_penalise`` applies it."""
    device = x.device
    m = len(group)
    lengths = np.fromiter((n for _, n, _ in group), dtype=np.int64, count=m)
    end = np.cumsum(lengths)
    start = end - lengths
    prompt = np.fromiter((p for _, _, p in group), dtype=np.int64, count=m)
    ints = np.stack([np.fromiter((r for r, _, _ in group), dtype=np.int64, count=m), start, end,
                     start + np.minimum(prompt, lengths)])
    ps = [items[r].params for r, _, _ in group]
    floats = np.array([[p.repetition_penalty for p in ps], [p.frequency_penalty for p in ps],
                       [p.presence_penalty for p in ps]], dtype=np.float32)
    table = host_values(np.concatenate([
        ints.ravel(), np.resize(floats, (2 * -(-3 * m // 2),)).view(np.int64)]),
        torch.int64, device)
    ints_d = table[:4 * m].view(4, m)
    floats_d = table[4 * m:].view(torch.float32)[:3 * m].view(3, m)
    if kernel is not None and not len(ids):  # every id dropped: still a pointer to pass
        ids = torch.zeros(1, dtype=torch.int64)
    ids = ids.to(device, non_blocking=True)
    count = bool(floats[1:].any())
    if kernel is not None:
        kernel(logits, x, ids, ints_d, floats_d, pending, count)
    else:
        _penalise(x, ids, ints_d, floats_d, pending, bool((floats[0] != 1.0).any()), count)


def _penalise(x: torch.Tensor, ids: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor,
              pending: torch.Tensor | None, repeat: bool, count: bool) -> None:
    """The torch path of ``_group`` (and the kernel's reference), in place on ``x``. The
    device expands the rows' table per entry, counts each (row, token)'s generated entries in a
    dense float32 buffer of the group's rows (an accumulating scatter: integer counts, exact in
    any order) and writes every entry's final logit ``rep(x) - (freq c + pres [c > 0])``
    computed from the original ``x``, so a token seen several times is written several times
    with the same value. About 30 ops whatever the histories' lengths, no per-entry work on the
    host (building per-entry arrays in numpy took ~2.4 ms a step at 256 rows of 800-token
    histories on the GPU host, more than the forward), and no wait for the device.
    ``repeat``: some row's repetition penalty is not 1; ``count``: some row has a frequency
    or presence penalty."""
    vocab = x.shape[1]
    device = x.device
    m, total = ints.shape[1], len(ids)
    local = torch.repeat_interleave(torch.arange(m, device=device), ints[2] - ints[1],
                                    output_size=total)
    if pending is not None:  # after every history: generated (at or past its row's start)
        k = pending.shape[1]
        ids = torch.cat([ids, pending[ints[0]].reshape(-1)])
        local = torch.cat([local, torch.arange(m, device=device).repeat_interleave(k)])
    row, _, _, gen_from = ints[:, local]
    by, freq, pres = floats[:, local]
    flat = x.view(-1)
    at = ids + row * vocab
    vals = flat.take(at)
    if repeat:
        vals = torch.where(vals > 0, vals / by, vals * by)
    if count:
        key = local * vocab + ids
        generated = torch.arange(len(key), device=device) >= gen_from
        counts = torch.zeros(m * vocab, dtype=torch.float32, device=device)
        counts.index_put_((key,), generated.to(torch.float32), accumulate=True)
        c = counts.take(key)
        vals = vals - (freq * c + pres * (c > 0))
    flat[at] = vals
