"""Greedy tokens: the first index of each row's maximum (``reference.argmax``'s contract, what
``logits.max(dim=-1).indices`` returns), as int64.

Two small kernels: ``[rows, chunks]`` programs each reduce ``BLOCK`` logits to their maximum and
its first index, then one program per row picks the first chunk holding the row's maximum. On a
150k-word row that is ~75 programs reading in parallel; torch's reduction runs one block per
row (11.4 us for a 32,000-word float32 row at batch 1, H200: ~1.5 % of a TinyLlama step). The
decode graphs capture it after the logits (``runner/cuda_graphs.py``), launched with PDL like
the kernels before it, so a greedy step runs no argmax outside the graph (1.8 + 1.1 us of
marginal time inside it for TinyLlama's 32,000 words).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modelhive.kernels.triton import pdl

#: logits per program of the first kernel
BLOCK = 2048


@triton.jit
def _chunk_max_kernel(x_ptr, val_ptr, idx_ptr, V, stride_x, CHUNKS, BLOCK: tl.constexpr,
                      USE_PDL: tl.constexpr, PDL_EARLY: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    pdl.wait(USE_PDL, PDL_EARLY)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=cols < V,
                other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN is the maximum, as in torch.max
    best = tl.argmax(x, 0, tie_break_left=True)
    out = row * CHUNKS + chunk
    tl.store(val_ptr + out, tl.max(x, 0))
    tl.store(idx_ptr + out, chunk * BLOCK + best)


@triton.jit
def _pick_chunk_kernel(val_ptr, idx_ptr, out_ptr, CHUNKS, BLOCK_C: tl.constexpr,
                       USE_PDL: tl.constexpr, PDL_EARLY: tl.constexpr):
    row = tl.program_id(0)
    pdl.wait(USE_PDL, PDL_EARLY)
    c = tl.arange(0, BLOCK_C)
    vals = tl.load(val_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"))
    first = tl.argmax(vals, 0, tie_break_left=True)  # the earliest chunk: the smallest index
    first = tl.minimum(first, CHUNKS - 1)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * CHUNKS + first).to(tl.int64))


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, vocab]`` -> ``[rows]`` int64: the first index of each row's maximum (written to
    ``out`` if given: a contiguous int64 ``[rows]``)."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    elif out.shape != (rows,) or out.dtype != torch.int64 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int64 tensor of shape ({rows},)")
    if rows == 0:
        return out
    chunks = triton.cdiv(vocab, BLOCK)
    vals = torch.empty((rows, chunks), dtype=torch.float32, device=logits.device)
    idx = torch.empty((rows, chunks), dtype=torch.int32, device=logits.device)
    use_pdl = pdl.enabled(logits)
    _chunk_max_kernel[(rows, chunks)](
        logits, vals, idx, vocab, logits.stride(0), chunks, BLOCK=BLOCK, USE_PDL=use_pdl,
        PDL_EARLY=pdl.EARLY, launch_pdl=use_pdl, num_warps=4)
    _pick_chunk_kernel[(rows,)](
        vals, idx, out, chunks, BLOCK_C=max(2, triton.next_power_of_2(chunks)), USE_PDL=use_pdl,
        PDL_EARLY=pdl.EARLY, launch_pdl=use_pdl, num_warps=1)
    return out
