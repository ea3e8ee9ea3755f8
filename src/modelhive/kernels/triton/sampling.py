"""Drawing each row's token in one kernel: temperature, top-k, top-p, min-p and the inverse-CDF
draw, without sorting the vocabulary. The torch path of ``engine/sampler.py`` (``_draw``) is the
reference and has the same definitions:

- ``x = logits * (1 / temperature)`` in float32 (the inverse given as float32);
- top-k keeps ``x >= `` the k-th largest value (ties with it kept);
- top-p keeps the tokens whose *strictly more probable* tokens hold at most ``top_p`` of the
  mass left by top-k (the smallest set of most probable tokens that reaches ``top_p``; ties at
  the cut kept);
- min-p keeps ``exp(x - max) >= min_p``;
- the draw is the first kept token whose cumulative mass, in vocabulary order, passes
  ``u * total`` (``u`` given per row); a temperature of 0 takes the first maximum (greedy).

One program per row. Top-k and top-p are thresholds on ``x``, and each is found by the same
search (``_select``): for a bracket ``(lo, hi]`` known to hold the threshold, a pass over the
row counts and sums the mass above ``NPIV`` pivots spread over the bracket and narrows it to one
pivot interval, until the bracket holds at most ``CAP`` tokens; those are then written to a
scratch row, sorted in registers and scanned for the exact threshold. On a language model's
peaked logits one pass usually brackets a few dozen tokens. Pivots are spread by value while the
bracket is wide and by the float's bit pattern when it is narrow, so the search ends exactly
even on ties. A row thus costs: a pass for the maximum and the softmax sum, a search pass or
two and a compaction pass per filter asked for (none for plain temperature), a pass for the
kept mass if min-p is on, and part of a pass for the draw, which stops at the drawn token. Where
the torch path sorted 64 rows of 151,936 logits at a time (5.9 ms a step at 256 rows on an
H200), nothing here sorts more than ``CAP`` values.

Float sums run in a different order than torch's, so a draw can differ from the torch path's
only where ``u`` lands within rounding of a token's cumulative boundary, or a top-p cut within
rounding of ``top_p``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: logits per loop iteration of a streaming pass (maximum and sum, compaction, kept mass, draw)
BLOCK = 8192
#: logits per loop iteration of a search pass (each is compared with every pivot)
SBLOCK = 1024
#: pivots a search pass places in the bracket
NPIV = 8
#: warps of a row's program
NUM_WARPS = 16
#: at most this many tokens in the bracket are sorted to finish a search
CAP = 1024
#: search passes at most (value pivots until the bracket is narrow, then bit-pattern pivots,
#: which end any bracket within 11 passes at 8 pivots)
ROUNDS = 40
#: columns of the per-row settings
SETTINGS = ("temperature", "inverse temperature", "top_k", "top_p", "min_p", "u")


@triton.jit
def _key(x):
    """float32 -> int32 with the floats' order (negative floats: the low 31 bits flipped)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _unkey(k):
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _below(v):
    """The float just below ``v`` (for 0: the smallest normal negative; the bit pattern below
    +0 is -0, which is not below it, and denormals may be flushed)."""
    b = _unkey(_key(v) - 1)
    return tl.where(tl.abs(b) < 1.1754944e-38, -1.1754944e-38, b)


@triton.jit
def _load(base, start, V, inv_t, BLOCK: tl.constexpr):
    cols = start + tl.arange(0, BLOCK)
    x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
    return cols, x


@triton.jit
def _select(base, V, inv_t, m, scratch, lo, c_lo, s_lo, ext, hi, c_hi, s_hi, kmax, L,
            BLOCK: tl.constexpr, SBLOCK: tl.constexpr, NPIV: tl.constexpr, CAP: tl.constexpr,
            ROUNDS: tl.constexpr):
    """The smallest value t of the row with count(x > t) <= kmax and mass(x > t) <= L (mass:
    the sum of exp(x - m)), given that this holds at ``hi`` and not at ``lo``; ``c_*``, ``s_*``:
    count and mass above them; ``ext``: the smallest value in ``(lo, hi]``. All arguments are
    scalar tensors. Returns t, count(x >= t), mass(x >= t).

    Each search pass places ``NPIV`` ascending pivots from ``ext`` (a value of the row, so a
    run of ties there is settled at once) towards ``hi``, by value, or by bit pattern once the
    bracket spans fewer than 2**22 floats, and keeps the interval where the condition starts to
    hold; it also finds the smallest value above each pivot, the next bracket's ``ext``."""
    j = tl.arange(0, NPIV)
    rounds = tl.zeros([], tl.int32)
    while (c_lo - c_hi > CAP) & (ext < hi) & (rounds < ROUNDS):
        kl = _key(ext).to(tl.int64)
        kh = _key(hi).to(tl.int64)
        by_value = ext + (hi - ext) * (j.to(tl.float32) / NPIV)
        by_bits = _unkey((kl + ((kh - kl) * j) // NPIV).to(tl.int32))
        piv = tl.where(kh - kl > (1 << 22), by_value, by_bits)
        piv = tl.minimum(tl.maximum(piv, ext), hi)
        # per-lane sums over the loop, across lanes after it (no reduction inside the loop)
        lane_c = tl.zeros([SBLOCK, NPIV], dtype=tl.int32)
        lane_s = tl.zeros([SBLOCK, NPIV], dtype=tl.float32)
        lane_l = tl.full([SBLOCK, NPIV], float("inf"), tl.float32)
        for start in range(0, V, SBLOCK):
            cols, x = _load(base, start, V, inv_t, SBLOCK)
            e = tl.exp(x - m)
            gt = x[:, None] > piv[None, :]
            lane_c += gt.to(tl.int32)
            lane_s += tl.where(gt, e[:, None], 0.0)
            lane_l = tl.minimum(lane_l, tl.where(gt, x[:, None], float("inf")))
        cnt = tl.sum(lane_c, 0)
        mass = tl.sum(lane_s, 0)
        low = tl.min(lane_l, 0)  # the smallest value above each pivot
        ok = (cnt <= kmax) & (mass <= L)  # false ... true: the pivots ascend
        bad = NPIV - tl.sum(ok.to(tl.int32), 0)  # index of the first pivot that holds
        first = j == bad
        last_bad = j == bad - 1
        if bad < NPIV:
            hi = tl.sum(tl.where(first, piv, 0.0), 0)
            c_hi = tl.sum(tl.where(first, cnt, 0), 0)
            s_hi = tl.sum(tl.where(first, mass, 0.0), 0)
        if bad > 0:
            lo = tl.sum(tl.where(last_bad, piv, 0.0), 0)
            c_lo = tl.sum(tl.where(last_bad, cnt, 0), 0)
            s_lo = tl.sum(tl.where(last_bad, mass, 0.0), 0)
            ext = tl.sum(tl.where(last_bad, low, 0.0), 0)
        rounds += 1
    n = c_lo - c_hi
    t = hi  # ext >= hi: every value in the bracket is hi
    c_ge = c_lo
    s_ge = s_lo
    if (ext < hi) & (n <= CAP):
        tl.debug_barrier()  # the scratch row may still be read by an earlier search
        pos = tl.zeros([], tl.int32)
        for start in range(0, V, BLOCK):
            cols, x = _load(base, start, V, inv_t, BLOCK)
            inside = (x > lo) & (x <= hi)
            at = pos + tl.cumsum(inside.to(tl.int32), 0) - 1
            tl.store(scratch + at, x, mask=inside & (at < CAP))
            pos += tl.sum(inside.to(tl.int32), 0)
        tl.debug_barrier()
        i = tl.arange(0, CAP)
        cand = tl.sort(tl.load(scratch + i, mask=i < n, other=float("-inf")), 0,
                       descending=True)
        e = tl.where(i < n, tl.exp(cand - m), 0.0)
        before = s_hi + (tl.cumsum(e, 0) - e)  # mass strictly before each, in sorted order
        ok = (c_hi + i <= kmax) & (before <= L) & (i < n)  # a tie's first copy decides
        t = tl.min(tl.where(ok, cand, float("inf")), 0)
        kept = (cand >= t) & (i < n)
        c_ge = c_hi + tl.sum(kept.to(tl.int32), 0)
        s_ge = s_hi + tl.sum(tl.where(kept, e, 0.0), 0)
    return t, c_ge, s_ge


@triton.jit
def _draw_kernel(x_ptr, stride_x, V, set_ptr, out_ptr, scratch_ptr, BLOCK: tl.constexpr,
                 SBLOCK: tl.constexpr, NPIV: tl.constexpr, CAP: tl.constexpr,
                 ROUNDS: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_x
    scratch = scratch_ptr + row.to(tl.int64) * CAP
    settings = set_ptr + row * 6
    temperature = tl.load(settings)
    inv_t = tl.where(temperature > 0, tl.load(settings + 1), 1.0)
    top_k = tl.load(settings + 2).to(tl.int32)
    top_p = tl.load(settings + 3)
    min_p = tl.load(settings + 4)
    u = tl.load(settings + 5)

    # the row's maximum (and its first index), smallest finite value, softmax sum: per lane
    # over the loop, across lanes after it (no reduction in the loop)
    lane_m = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_z = tl.zeros([BLOCK], tl.float32)
    lane_arg = tl.zeros([BLOCK], tl.int32)
    lane_min = tl.full([BLOCK], float("inf"), tl.float32)
    lane_n = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        cols, x = _load(base, start, V, inv_t, BLOCK)
        new_m = tl.maximum(lane_m, x)
        finite = x > float("-inf")
        lane_z = tl.where(new_m > float("-inf"),
                          lane_z * tl.exp(lane_m - new_m) + tl.exp(x - new_m), lane_z)
        lane_arg = tl.where(x > lane_m, cols, lane_arg)  # a lane's first maximum
        lane_min = tl.minimum(lane_min, tl.where(finite, x, float("inf")))
        lane_n += finite.to(tl.int32)
        lane_m = new_m
    m = tl.max(lane_m, 0)
    z = tl.sum(tl.where(lane_m > float("-inf"), lane_z * tl.exp(lane_m - m), 0.0), 0)
    arg = tl.min(tl.where(lane_m == m, lane_arg, V), 0)  # the first maximum of the row
    xmin = tl.min(lane_min, 0)
    n_fin = tl.sum(lane_n, 0)

    token = arg
    if temperature > 0:
        zero_i = tl.zeros([], tl.int32)
        zero_f = tl.zeros([], tl.float32)
        t = tl.full([], float("-inf"), tl.float32)  # keep x >= t
        below = _below(xmin)  # "all tokens"
        c_ge = n_fin
        s_ge = z
        if (top_k > 0) & (top_k < n_fin):
            t, c_ge, s_ge = _select(base, V, inv_t, m, scratch, below, n_fin, z, xmin, m, zero_i,
                                    zero_f, top_k - 1, zero_f + float("inf"),
                                    BLOCK, SBLOCK, NPIV, CAP, ROUNDS)
        limit = top_p * s_ge
        if (top_p < 1.0) & (s_ge > limit):
            lo = tl.where(t > float("-inf"), _below(t), below)
            ext = tl.where(t > float("-inf"), t, xmin)
            t, c_ge, s_ge = _select(base, V, inv_t, m, scratch, lo, c_ge, s_ge, ext, m, zero_i,
                                    zero_f, n_fin, limit, BLOCK, SBLOCK, NPIV, CAP, ROUNDS)
        total = s_ge
        if min_p > 0:
            lane_t = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                cols, x = _load(base, start, V, inv_t, BLOCK)
                e = tl.exp(x - m)
                lane_t += tl.where((x >= t) & (e >= min_p), e, 0.0)
            total = tl.sum(lane_t, 0)
        # inverse CDF: the first kept token whose cumulative mass passes u * total
        target = u * total
        run = tl.zeros([], tl.float32)
        last = tl.zeros([], tl.int32)  # the last kept token so far (rounding's fallback)
        found = tl.zeros([], tl.int32) - 1
        start = 0
        while (start < V) & (found < 0):
            cols, x = _load(base, start, V, inv_t, BLOCK)
            e = tl.exp(x - m)
            kept = (x >= t) & (e >= min_p) & (cols < V)
            e = tl.where(kept, e, 0.0)
            if run + tl.sum(e, 0) > target:
                hit = (run + tl.cumsum(e, 0) > target) & kept
                found = tl.min(tl.where(hit, cols, V), 0)
                if found >= V:
                    found = tl.max(tl.where(kept, cols, -1), 0)
            else:
                run += tl.sum(e, 0)
                last = tl.maximum(last, tl.max(tl.where(kept, cols, -1), 0))
            start += BLOCK
        token = tl.where(found >= 0, found, last)
    tl.store(out_ptr + row, token.to(tl.int64))


def draw(logits: torch.Tensor, settings: torch.Tensor,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``logits`` ``[rows, vocab]`` (any float dtype, unit column stride)
    under ``settings`` ``[rows, 6]`` float32 (columns: ``SETTINGS``; temperature 0: greedy;
    top_k 0: off; top_p 1: off; min_p 0: off), as int64 ``[rows]`` (into ``out`` if given)."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if settings.shape != (rows, 6) or settings.dtype != torch.float32:
        raise ValueError(f"settings must be float32 of shape ({rows}, 6)")
    settings = settings.contiguous()
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    scratch = torch.empty((rows, CAP), dtype=torch.float32, device=logits.device)
    _draw_kernel[(rows,)](logits, logits.stride(0), vocab, settings, out, scratch,
                          BLOCK=BLOCK, SBLOCK=SBLOCK, NPIV=NPIV, CAP=CAP, ROUNDS=ROUNDS,
                          num_warps=NUM_WARPS)
    return out
