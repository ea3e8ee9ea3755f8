"""Repetition, frequency and presence penalties in one kernel. The torch code of
``engine/penalties.py`` (``_penalise``) is the reference and the CPU's path, with the same
definitions and the same float32 arithmetic:

- a token of the row's history (prompt and generated, ``rep`` != 1): ``x / rep`` where the
  logit is positive, ``x * rep`` elsewhere;
- then, with ``c`` the token's count among the generated tokens:
  ``x - (freq * c + pres * (c > 0))``.

Every entry's value is computed from the unmodified ``logits`` and stored into the float32 copy
``x``, so a token seen several times is written several times with the same value. The products,
the division and the sum are correctly rounded and never fused (``mul_rn``, ``div_rn``: an FMA
would round once where torch rounds twice), so the values are torch's to the bit.

One program takes rows ``pid, pid + P, ...``. For a row it counts the generated tokens into its
own ``[vocab]`` int32 row of ``counts`` (global atomics), reads them back after a barrier, writes
the entries' values, and after another barrier sets what it counted back to zero: ``counts``
starts zero and each program's row is zero again between rows. The caller hands over the
histories end to end and a per-row table; tokens a step launched ahead has produced but the host
has not seen (``pending``) count as generated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

#: history entries per loop iteration
BLOCK = 512
#: programs at most (each with a ``[vocab]`` int32 row of counts)
PROGRAMS = 128
#: the per-row table's columns (``penalise``'s ``ints`` and ``floats``)
INT_COLUMNS = ("row", "start", "end", "generated from")
FLOAT_COLUMNS = ("repetition", "frequency", "presence")


@triton.jit
def _value(src, counts, t, mask, rep, freq, pres, count):
    """The penalised float32 logit of tokens ``t`` of a row whose logits start at ``src``."""
    v = tl.load(src + t, mask=mask, other=0.0).to(tl.float32)
    v = tl.where(v > 0, libdevice.div_rn(v, rep), libdevice.mul_rn(v, rep))
    if count:
        c = tl.load(counts + t, mask=mask, other=0, cache_modifier=".cg").to(tl.float32)
        used = (c > 0).to(tl.float32)
        v = v - libdevice.add_rn(libdevice.mul_rn(freq, c), libdevice.mul_rn(pres, used))
    return v


@triton.jit
def _count(counts, ids_ptr, gen, end, ahead, offs, ks, K: tl.constexpr, ZERO: tl.constexpr,
           BLOCK: tl.constexpr):
    """Add one to ``counts`` for each generated token of a row (``ids[gen:end]``, then the
    ``K`` pending ones at ``ahead``), or with ``ZERO`` set those counts back to zero."""
    for off in range(gen, end, BLOCK):
        i = off + offs
        t = tl.load(ids_ptr + i, mask=i < end, other=0)
        if ZERO:
            tl.store(counts + t, 0, mask=i < end)
        else:
            tl.atomic_add(counts + t, 1, mask=i < end)
    if K > 0:
        tp = tl.load(ahead + ks, mask=ks < K, other=0)
        if ZERO:
            tl.store(counts + tp, 0, mask=ks < K)
        else:
            tl.atomic_add(counts + tp, 1, mask=ks < K)


#: the arguments Triton would otherwise specialise on (integers == 1 or divisible by 16,
#: pointers by their alignment): each new combination would compile the kernel again in the
#: middle of serving (the row count ``m`` changes every step), while the engine's warm-up
#: (``Engine.warm_up``) compiles the few variants there are: the constexprs (pending tokens or
#: none) and the logits' dtype
_INTS = ["logits_stride", "x_stride", "m", "pending_stride", "count", "vocab"]
_POINTERS = ["logits_ptr", "pending_ptr"]


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_INTS + _POINTERS)
def _penalty_kernel(logits_ptr, logits_stride, x_ptr, x_stride, ids_ptr, ints_ptr, floats_ptr,
                    m, pending_ptr, pending_stride, counts_ptr, count, vocab,
                    K: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    counts = counts_ptr + pid.to(tl.int64) * vocab
    offs = tl.arange(0, BLOCK)
    ks = tl.arange(0, KB)
    for g in range(pid, m, tl.num_programs(0)):
        row = tl.load(ints_ptr + g)
        start = tl.load(ints_ptr + m + g)
        end = tl.load(ints_ptr + 2 * m + g)
        gen = tl.load(ints_ptr + 3 * m + g)
        rep = tl.load(floats_ptr + g)
        freq = tl.load(floats_ptr + m + g)
        pres = tl.load(floats_ptr + 2 * m + g)
        src = logits_ptr + row * logits_stride
        dst = x_ptr + row * x_stride
        ahead = pending_ptr + row * pending_stride
        if count:  # the generated tokens' counts
            _count(counts, ids_ptr, gen, end, ahead, offs, ks, K, False, BLOCK)
            tl.debug_barrier()
        for off in range(start, end, BLOCK):
            i = off + offs
            th = tl.load(ids_ptr + i, mask=i < end, other=0)
            vh = _value(src, counts, th, i < end, rep, freq, pres, count)
            tl.store(dst + th, vh, mask=i < end)
        if K > 0:
            tp = tl.load(ahead + ks, mask=ks < K, other=0)
            vp = _value(src, counts, tp, ks < K, rep, freq, pres, count)
            tl.store(dst + tp, vp, mask=ks < K)
        if count:  # back to zero for the program's next row
            tl.debug_barrier()
            _count(counts, ids_ptr, gen, end, ahead, offs, ks, K, True, BLOCK)
            tl.debug_barrier()


def penalise(logits: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, ints: torch.Tensor,
             floats: torch.Tensor, pending: torch.Tensor | None = None,
             count: bool = True) -> None:
    """Write the penalised values of every history entry into ``x`` (float32 ``[rows, vocab]``,
    unit column stride), from ``logits`` (``[rows, vocab]``, any float dtype, unmodified).
    ``ids``: int64, the histories end to end; ``ints``: int64 ``[4, m]`` and ``floats``:
    float32 ``[3, m]``, the per-row table of m rows (columns ``INT_COLUMNS``, ``FLOAT_COLUMNS``;
    "start", "end" and "generated from" index ``ids``); ``pending``: int64 ``[rows, k]``
    generated tokens past the histories; ``count``: some row has a frequency or presence
    penalty (else the counts are skipped). Ids must lie in ``[0, vocab)``."""
    m = ints.shape[1]
    if ints.shape != (4, m) or floats.shape != (3, m) or ints.dtype != torch.int64 \
            or floats.dtype != torch.float32:
        raise ValueError("ints must be int64 [4, m] and floats float32 [3, m]")
    if logits.stride(1) != 1 or x.stride(1) != 1 or x.dtype != torch.float32:
        raise ValueError("logits and a float32 x with unit column strides expected")
    if m == 0:
        return
    ints, floats = ints.contiguous(), floats.contiguous()
    k = 0 if pending is None else pending.shape[1]
    if pending is None:
        pending = ids
    elif pending.stride(1) != 1:
        pending = pending.contiguous()
    programs = min(m, PROGRAMS)
    vocab = logits.shape[1]
    # without counts the kernel never reads them: any int32 pointer keeps one compiled variant
    counts = (torch.zeros((programs, vocab), dtype=torch.int32, device=x.device) if count
              else ints.view(torch.int32))
    _penalty_kernel[(programs,)](
        logits, logits.stride(0), x, x.stride(0), ids, ints, floats, m, pending,
        pending.stride(0) if k else 0, counts, int(count), vocab, K=k,
        KB=max(triton.next_power_of_2(k), 1), BLOCK=BLOCK, num_warps=4)
