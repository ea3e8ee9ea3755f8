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
kept mass if min-p is on, and part of a pass for the draw, which stops at the drawn token.

Most rows need no search pass at all. The first pass's per-lane maxima are values of different
tokens; the k-th largest of their ``CAP`` group maxima (sorted in registers) has at least k
tokens at or above it (top-k up to ``CAP``), and so does, for top-p, the group maximum where the
group maxima's own mass first passes ``top_p`` (on a peaked row; a flat row's group maxima hold
too little of its mass). On a language model's row hardly more tokens than are kept lie above
such a floor, and one compaction takes them all (a search when more than ``CAP`` do). When a
compaction holds every token above its low end (that one, or a search's that ends with at most
``CAP`` tokens above it), it keeps their ids too, in vocabulary order ("whole"): that is the
whole kept set, so the filters after it (top-p after top-k) and the draw (min-p included) work
on the scratch row in registers, without another pass over the vocabulary. Top-k 20 + top-p
0.8, say, then costs two passes (maximum and sum, one compaction) instead of a search pass (eight
pivots a value) and four others. Where the torch path sorted 64 rows of 151,936 logits at a
time (5.9 ms a step at 256 rows on an H200), nothing here sorts more than ``CAP`` values.

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
def _select(base, V, inv_t, m, scratch, scratch_ids, lo, c_lo, s_lo, ext, hi, c_hi, s_hi,
            kmax, L, BLOCK: tl.constexpr, SBLOCK: tl.constexpr, NPIV: tl.constexpr,
            CAP: tl.constexpr, ROUNDS: tl.constexpr):
    """The smallest value t of the row with count(x > t) <= kmax and mass(x > t) <= L (mass:
    the sum of exp(x - m)), given that this holds at ``hi`` and not at ``lo``; ``c_*``, ``s_*``:
    count and mass above them; ``ext``: the smallest value in ``(lo, hi]``. All arguments are
    scalar tensors. Returns t, count(x >= t), mass(x >= t) and, when the scratch row then
    holds every value of the row above ``lo`` (at most ``CAP``: all of t's kept set) with its
    id, in vocabulary order, how many ("whole"), else 0.

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
    # every value above lo fits the scratch row: the compaction takes those above hi too, so
    # that what follows the search (another filter, the draw) needs no pass over the row
    whole = c_lo <= CAP
    if whole:
        hi = tl.full([], float("inf"), tl.float32)
        c_hi = tl.zeros([], tl.int32)
        s_hi = tl.zeros([], tl.float32)
    n = c_lo - c_hi
    t = hi  # ext >= hi: every value in the bracket is hi
    c_ge = c_lo
    s_ge = s_lo
    if ((ext < hi) | whole) & (n <= CAP):
        _compact(base, V, inv_t, scratch, scratch_ids, lo, hi, BLOCK, CAP)
        t, c_ge, s_ge = _sorted_cut(scratch, n, m, lo, c_hi, s_hi, kmax, L, CAP)
    return t, c_ge, s_ge, tl.where(whole, n, 0).to(tl.int32)


@triton.jit
def _compact(base, V, inv_t, scratch, scratch_ids, lo, hi, BLOCK: tl.constexpr,
             CAP: tl.constexpr):
    """Write the row's values in ``(lo, hi]`` and their ids to the scratch row, in vocabulary
    order (the first ``CAP`` of them); returns how many there are."""
    tl.debug_barrier()  # the scratch row may still be read by an earlier search
    pos = tl.zeros([], tl.int32)
    for start in range(0, V, BLOCK):
        cols, x = _load(base, start, V, inv_t, BLOCK)
        inside = (x > lo) & (x <= hi)
        at = pos + tl.cumsum(inside.to(tl.int32), 0) - 1
        tl.store(scratch + at, x, mask=inside & (at < CAP))
        tl.store(scratch_ids + at, cols, mask=inside & (at < CAP))
        pos += tl.sum(inside.to(tl.int32), 0)
    tl.debug_barrier()
    return pos


@triton.jit
def _sorted_cut(scratch, n, m, floor, c_hi, s_hi, kmax, L, CAP: tl.constexpr):
    """The search's last step on the scratch row's ``n`` values above ``floor`` (the others
    masked), sorted in registers: the smallest t among them with count(x > t) <= kmax and
    mass(x > t) <= L, given ``c_hi`` values of mass ``s_hi`` above them all. Returns t and
    the count and mass at or above it."""
    i = tl.arange(0, CAP)
    x = tl.load(scratch + i, mask=i < n, other=float("-inf"))
    cand = tl.sort(tl.where(x > floor, x, float("-inf")), 0, descending=True)
    live = cand > float("-inf")
    e = tl.where(live, tl.exp(cand - m), 0.0)
    before = s_hi + (tl.cumsum(e, 0) - e)  # mass strictly before each, in sorted order
    ok = (c_hi + i <= kmax) & (before <= L) & live  # a tie's first copy decides
    t = tl.min(tl.where(ok, cand, float("inf")), 0)
    kept = live & (cand >= t)
    return t, c_hi + tl.sum(kept.to(tl.int32), 0), s_hi + tl.sum(tl.where(kept, e, 0.0), 0)


@triton.jit
def _lane_floor(groups, m, k, L, CAP: tl.constexpr):
    """A value the row's kept set lies at or above, from the ``CAP`` group maxima of its first
    pass's per-lane maxima (-inf where they do not tell): each is a different token's value, so
    the k-th largest has at least k tokens at or above it (top-k, k <= CAP), and a group maximum
    whose larger-or-equal group maxima hold more than ``L`` of the mass has every top-p-kept
    token at or above it (``L`` with a margin for the float sums; k = 0). On a language
    model's row hardly more tokens than those kept lie above either."""
    floor = tl.full([], float("-inf"), tl.float32)
    if k > 0:
        top = tl.sort(groups, 0, descending=True)
        floor = tl.sum(tl.where(tl.arange(0, CAP) == k - 1, top, 0.0), 0)
    else:
        bound = L * 1.001 + 1e-30
        # a flat row's group maxima hold too little of its mass: no sort then
        if tl.sum(tl.where(groups > float("-inf"), tl.exp(groups - m), 0.0), 0) > bound:
            top = tl.sort(groups, 0, descending=True)
            e = tl.where(top > float("-inf"), tl.exp(top - m), 0.0)
            floor = tl.max(tl.where(tl.cumsum(e, 0) > bound, top, float("-inf")), 0)
    return floor


@triton.jit
def _whole_above(base, V, inv_t, m, scratch, scratch_ids, floor, kmax, L, t, c_ge, s_ge,
                 BLOCK: tl.constexpr, CAP: tl.constexpr):
    """Compact every token at or above ``floor`` (``_lane_floor``) and cut there as ``_select``
    does. Returns t, the count and mass at or above it, and how many tokens the scratch row
    holds; when the floor tells nothing or more than ``CAP`` tokens lie above it, 0 and the
    ``t``, ``c_ge``, ``s_ge`` given."""
    whole = tl.zeros([], tl.int32)
    if floor > float("-inf"):
        lo = _below(floor)
        n = _compact(base, V, inv_t, scratch, scratch_ids, lo, float("inf"), BLOCK, CAP)
        if n <= CAP:
            t, c_ge, s_ge = _sorted_cut(scratch, n, m, lo, whole, 0.0, kmax, L, CAP)
            whole = n
    return t, c_ge, s_ge, whole


@triton.jit
def _draw_in_scratch(scratch, scratch_ids, n, m, t, min_p, u, CAP: tl.constexpr):
    """The draw (min-p included) when the scratch row holds every kept token (``whole``):
    its values are in vocabulary order, so the inverse CDF is one cumulative sum over them."""
    i = tl.arange(0, CAP)
    x = tl.load(scratch + i, mask=i < n, other=float("-inf"))
    ids = tl.load(scratch_ids + i, mask=i < n, other=0)
    e = tl.exp(x - m)
    kept = (x >= t) & (e >= min_p) & (i < n)
    e = tl.where(kept, e, 0.0)
    run = tl.cumsum(e, 0)
    target = u * tl.sum(e, 0)
    found = tl.min(tl.where((run > target) & kept, ids, 2**31 - 1), 0)
    last = tl.max(tl.where(kept, ids, -1), 0)  # rounding's fallback: the last kept token
    return tl.where(found < 2**31 - 1, found, last)


@triton.jit
def _draw_in_row(base, V, inv_t, m, t, s_ge, min_p, u, BLOCK: tl.constexpr):
    """The draw (min-p included) by passes over the row: the kept mass (only with min-p: else
    it is ``s_ge``, the mass at or above ``t``), then the inverse CDF, which stops at the
    first kept token whose cumulative mass in vocabulary order passes ``u`` times it."""
    total = s_ge
    if min_p > 0:
        lane_t = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols, x = _load(base, start, V, inv_t, BLOCK)
            e = tl.exp(x - m)
            lane_t += tl.where((x >= t) & (e >= min_p), e, 0.0)
        total = tl.sum(lane_t, 0)
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
    return tl.where(found >= 0, found, last)


@triton.jit
def _draw_kernel(x_ptr, stride_x, V, set_ptr, out_ptr, scratch_ptr, scratch_ids_ptr,
                 BLOCK: tl.constexpr, SBLOCK: tl.constexpr, NPIV: tl.constexpr,
                 CAP: tl.constexpr, ROUNDS: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_x
    scratch = scratch_ptr + row.to(tl.int64) * (2 * CAP)  # CAP values, then CAP ids
    scratch_ids = scratch_ids_ptr + row.to(tl.int64) * (2 * CAP) + CAP
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
    # CAP group maxima of the lanes' maxima for ``_lane_floor`` (any grouping will do), taken
    # now so that the lanes' registers are free in the passes after this one
    groups = tl.full([CAP], float("-inf"), tl.float32)
    if (temperature > 0) & ((top_k > 0) | (top_p < 1.0)):
        groups = tl.max(tl.reshape(lane_m, [CAP, BLOCK // CAP], can_reorder=True), 1)

    token = arg
    if temperature > 0:
        zero_i = tl.zeros([], tl.int32)
        zero_f = tl.zeros([], tl.float32)
        t = tl.full([], float("-inf"), tl.float32)  # keep x >= t
        below = _below(xmin)  # "all tokens"
        c_ge = n_fin
        s_ge = z
        # values in the scratch row when it holds the whole kept set (``_select``), else 0
        whole = zero_i
        inf = zero_f + float("inf")
        if (top_k > 0) & (top_k < n_fin):
            if top_k <= CAP:  # the first pass's lane maxima bound the k-th value from below
                t, c_ge, s_ge, whole = _whole_above(
                    base, V, inv_t, m, scratch, scratch_ids,
                    _lane_floor(groups, m, top_k, inf, CAP), top_k - 1, inf, t, c_ge, s_ge,
                    BLOCK, CAP)
            if whole == 0:
                t, c_ge, s_ge, whole = _select(base, V, inv_t, m, scratch, scratch_ids, below,
                                               n_fin, z, xmin, m, zero_i, zero_f, top_k - 1, inf,
                                               BLOCK, SBLOCK, NPIV, CAP, ROUNDS)
        limit = top_p * s_ge
        if (top_p < 1.0) & (s_ge > limit):
            if whole > 0:  # top-k left at most CAP tokens, all in the scratch row
                t, c_ge, s_ge = _sorted_cut(scratch, whole, m, _below(t), zero_i, zero_f, n_fin,
                                            limit, CAP)
            else:
                if t == float("-inf"):  # no top-k: the lane maxima may bound the cut
                    t, c_ge, s_ge, whole = _whole_above(
                        base, V, inv_t, m, scratch, scratch_ids,
                        _lane_floor(groups, m, 0, limit, CAP), n_fin, limit, t, c_ge, s_ge,
                        BLOCK, CAP)
            if whole == 0:
                lo = tl.where(t > float("-inf"), _below(t), below)
                ext = tl.where(t > float("-inf"), t, xmin)
                t, c_ge, s_ge, whole = _select(base, V, inv_t, m, scratch, scratch_ids, lo, c_ge,
                                               s_ge, ext, m, zero_i, zero_f, n_fin, limit, BLOCK,
                                               SBLOCK, NPIV, CAP, ROUNDS)
        if whole > 0:  # no pass over the row: min-p and the draw from the scratch row
            token = _draw_in_scratch(scratch, scratch_ids, whole, m, t, min_p, u, CAP)
        else:
            token = _draw_in_row(base, V, inv_t, m, t, s_ge, min_p, u, BLOCK)
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
    # per row: CAP values, then their CAP ids (int32 through a view of the same memory)
    scratch = torch.empty((rows, 2 * CAP), dtype=torch.float32, device=logits.device)
    _draw_kernel[(rows,)](logits, logits.stride(0), vocab, settings, out, scratch,
                          scratch.view(torch.int32),
                          BLOCK=BLOCK, SBLOCK=SBLOCK, NPIV=NPIV, CAP=CAP, ROUNDS=ROUNDS,
                          num_warps=NUM_WARPS)
    return out
