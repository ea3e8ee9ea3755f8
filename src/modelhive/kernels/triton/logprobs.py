"""Logprobs of a step's rows without a float32 log-softmax of the whole vocabulary. The torch code
of ``engine/sampler.py`` (``_logprobs``: ``log_softmax``, ``gather``, ``topk``) is the reference
and the CPU's path, with the same definitions: each row's logprob of its chosen token in the raw
distribution, ``x - logsumexp(x)`` in float32, and its ``k`` largest logprobs with their ids.

Two launches. The first runs a program per ``CHUNK`` logits of a row: it reads them once (in the
model's dtype), writes their maximum and their sum of ``exp(x - max)``, and picks their ``k``
largest values by ``k`` reductions over the chunk in registers (the first index among equal
values), writing the values and ids. The second runs a program per row: it merges the chunks'
maxima and sums into the row's log-sum-exp, reads the chosen token's logit, and picks the row's
``k`` largest among the chunks' candidates the same way (equal values: the smallest id first).
``k`` is a runtime argument and every integer and pointer is left unspecialised, so each logits
dtype and vocabulary compiles once whatever ``k``, row count or alignment a step brings.

Where torch's ``topk`` over a ``[232, 151936]`` float32 log-softmax took ~0.47 ms and the
log-softmax with its upcast ~0.25 ms of an H200 decode step (``bench/gpu_throughput_trace.py
... logprobs=1``), this reads the logits once. The sums run in another order than torch's, so
the values agree with the reference within float32 rounding, not to the bit; ties among the
``k`` largest may come in another order than torch's (``topk`` does not define one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modelhive.sampling_params import MAX_LOGPROBS

#: logits a program of the first launch reads
CHUNK = 4096


@triton.jit
def _take_largest(x, ids, k, shift, val_out, id_out, offs):
    """Write the ``k`` largest of ``x`` (equal values: the first position) less ``shift``, and
    their ``ids``."""
    for j in range(k):
        best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(val_out + j, best - shift)
        tl.store(id_out + j, tl.sum(tl.where(offs == at, ids, 0), 0))
        x = tl.where(offs == at, float("-inf"), x)


_INTS = ["stride", "V", "C", "k"]


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_INTS + ["x_ptr"])
def _chunk_kernel(x_ptr, stride, V, C, k, max_ptr, sum_ptr, val_ptr, id_ptr,
                  CHUNK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    offs = tl.arange(0, CHUNK)
    cols = c * CHUNK + offs
    x = tl.load(x_ptr + row.to(tl.int64) * stride + cols, mask=cols < V,
                other=float("-inf")).to(tl.float32)
    m = tl.max(x, 0)
    at = row * C + c
    tl.store(max_ptr + at, m)
    tl.store(sum_ptr + at, tl.sum(tl.exp(x - m), 0))
    _take_largest(x, cols, k, 0.0, val_ptr + at * k, id_ptr + at * k, offs)


_ROW_INTS = ["stride", "C", "k"]


@triton.jit(do_not_specialize=_ROW_INTS,
            do_not_specialize_on_alignment=_ROW_INTS + ["x_ptr", "tok_ptr"])
def _row_kernel(x_ptr, stride, C, k, tok_ptr, max_ptr, sum_ptr, val_ptr, id_ptr,
                chosen_ptr, top_val_ptr, top_id_ptr, CB: tl.constexpr, NB: tl.constexpr):
    row = tl.program_id(0)
    cs = tl.arange(0, CB)
    m = tl.load(max_ptr + row * C + cs, mask=cs < C, other=float("-inf"))
    s = tl.load(sum_ptr + row * C + cs, mask=cs < C, other=0.0)
    top = tl.max(m, 0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
    tok = tl.load(tok_ptr + row)
    x = tl.load(x_ptr + row.to(tl.int64) * stride + tok).to(tl.float32)
    tl.store(chosen_ptr + row, x - lse)
    if k > 0:
        ns = tl.arange(0, NB)
        base = row * C * k
        v = tl.load(val_ptr + base + ns, mask=ns < C * k, other=float("-inf"))
        ids = tl.load(id_ptr + base + ns, mask=ns < C * k, other=0)
        _take_largest(v, ids.to(tl.int64), k, lse, top_val_ptr + row * k, top_id_ptr + row * k,
                      ns)


def logprobs(logits: torch.Tensor, tokens: torch.Tensor,
             k: int = 0) -> tuple[torch.Tensor, ...]:
    """``logits``: ``[rows, vocab]`` (any float dtype, unit column stride); ``tokens``: each
    row's chosen id. Returns float32 ``[rows]`` logprobs of the chosen tokens and, with
    ``k`` > 0, float32 ``[rows, k]`` largest logprobs and their int64 ids, as
    ``engine/sampler.py``'s torch path does."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits with a unit column stride expected")
    if not 0 <= k <= min(MAX_LOGPROBS, vocab):
        raise ValueError(f"k must lie in [0, {min(MAX_LOGPROBS, vocab)}]")
    dev = logits.device
    chosen = torch.empty(rows, dtype=torch.float32, device=dev)
    top_vals = torch.empty((rows, k), dtype=torch.float32, device=dev)
    top_ids = torch.empty((rows, k), dtype=torch.int64, device=dev)
    if rows == 0:
        return (chosen,) if not k else (chosen, top_vals, top_ids)
    C = triton.cdiv(vocab, CHUNK)
    maxima = torch.empty((rows, C), dtype=torch.float32, device=dev)
    sums = torch.empty_like(maxima)
    vals = torch.empty((rows, C, max(k, 1)), dtype=torch.float32, device=dev)
    ids = torch.empty((rows, C, max(k, 1)), dtype=torch.int32, device=dev)
    tokens = tokens.contiguous()
    _chunk_kernel[(rows, C)](logits, logits.stride(0), vocab, C, k, maxima, sums, vals, ids,
                             CHUNK=CHUNK, num_warps=4)
    _row_kernel[(rows,)](logits, logits.stride(0), C, k, tokens, maxima, sums, vals, ids,
                         chosen, top_vals, top_ids, CB=triton.next_power_of_2(C),
                         NB=triton.next_power_of_2(C * MAX_LOGPROBS), num_warps=4)
    return (chosen,) if not k else (chosen, top_vals, top_ids)
