"""Sampler: logits [rows, vocab] -> one token per row, plus optional logprobs.

Order of processing (vLLM's): penalties (repetition, presence, frequency) -> temperature ->
top-k -> top-p -> min-p -> draw. Greedy rows (temperature 0) take the argmax of the penalised
logits. Logprobs are those of the model's raw distribution (log_softmax of the unprocessed logits),
as vLLM returns by default. Definitions: the temperature multiplies by its float32 inverse; top-k
keeps the values not below the k-th largest; top-p keeps a token when the tokens strictly more
probable than it hold at most ``top_p`` of the mass (ties at the cut kept); min-p keeps
``p >= min_p * p_max``.

On CUDA, steps of ``KERNEL_MIN_ROWS`` rows or more draw every row (greedy ones too) in one
Triton kernel (``kernels/triton/sampling.py``) that finds the top-k / top-p thresholds without
sorting the vocabulary; the torch code here (``_draw``) is its reference, and the CPU's path.

Logprobs (``logprobs``) take one Triton kernel pair on CUDA (``kernels/triton/logprobs.py``:
the log-sum-exp and the top alternatives from one read of the logits), a float32 log-softmax
and ``topk`` here otherwise (``_logprobs``, its reference). The penalties are
``engine/penalties.py``. Every stage works on the whole batch at once, its
per-row settings in one small tensor copied from pinned memory without waiting for the device: a
step costs a fixed handful of kernels whatever its row count (one launch chain per row cost ~0.1
ms a row on a GPU host, more than the forward of a 256-row decode step). Stages no row asks for
are skipped; a row that does not use a stage that runs gets a setting under which it changes
nothing (top-k off: threshold -inf; top-p 1: nothing dropped; min-p 0). The work is in place on
one float32 copy of the logits; top-p sorts ``SAMPLER_SORT_ROWS`` rows at a time, and on the CPU
first looks for each row's nucleus among its top logits (``_top_p_from_candidates``). On the
CPU, rows with a top-k of at most ``TOP_K_CANDIDATES`` draw from their top-k candidates alone
(``_draw_from_top_k``: no softmax or sort over the vocabulary).
``planner.estimates.sampler_bytes`` is the peak the memory plan reserves for all this.

The draw is by inverse CDF: one uniform u per row, the first token whose cumulative probability
passes u (an exact sample from ``probs``). The uniforms are made on the host (``uniforms``) and
copied with the step's other settings. Seeded rows are reproducible whatever shares their batch,
on any device, and across preemption: the i-th generated token's u is a hash of (seed, i).
Unseeded rows take theirs in one call from the runner's CPU ``generator``. Each row's arithmetic
is the same whether it is sampled alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from modelhive.engine.host_copy import device_index, host_values
from modelhive.engine.penalties import penalised
from modelhive.engine.sequence import SampledToken, ScheduledSeq
from modelhive.kernels import ops
from modelhive.planner.estimates import SAMPLER_KERNEL, SAMPLER_KERNEL_MIN_ROWS, SAMPLER_SORT_ROWS

__all__ = ["choose", "device_index", "logprobs", "penalised", "sample", "sampled_tokens",
           "token_logprobs"]

_SEED_STRIDE = 1_000_003
#: draw on CUDA with the Triton kernel (``kernels/triton/sampling.py``); env
#: ``MODELHIVE_SAMPLER_KERNEL=0``: the torch path (the memory plan follows the same switch)
KERNEL = SAMPLER_KERNEL
#: ... for steps of at least this many rows: the kernel runs one program per row, a few passes
#: over its vocabulary each, which at a row or two takes longer than torch's whole-device ops
#: (H200, 151,936 words: top-p 0.26-0.68 ms a row alone, not faster than the sort there)
KERNEL_MIN_ROWS = SAMPLER_KERNEL_MIN_ROWS


def _row_values(values: Sequence[float], device: torch.device) -> torch.Tensor | float:
    """Per-row settings as a float32 column ``[rows, 1]`` on ``device`` (no sync), or one
    Python number when every row has the same (the usual batch: no copy at all)."""
    first = values[0]
    if all(v == first for v in values):
        return float(first)
    return host_values(list(values), torch.float32, device)[:, None]


def _filter_rows(x: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float],
                 min_p: Sequence[float]) -> torch.Tensor:
    """Mask (to -inf), in place, each row's tokens outside its top-k / top-p / min-p; ``x``:
    float32 temperature-scaled logits ``[rows, vocab]``, contiguous. Returns ``x``. The top-p
    sort runs on ``SAMPLER_SORT_ROWS`` rows at a time (``planner.estimates.sampler_bytes``)."""
    vocab = x.shape[-1]
    device = x.device
    neg_inf = float("-inf")
    ks = [k if 0 < k < vocab else 0 for k in top_k]
    if any(ks):  # the k-th largest value of each row is its threshold (-inf: top-k off)
        kmax = max(ks)
        top = torch.topk(x, kmax, dim=-1).values
        if all(k == kmax for k in ks):
            kth = top[:, -1:]
        else:
            k_col = host_values(ks, torch.int64, device)[:, None]
            kth = top.gather(1, (k_col - 1).clamp_(min=0)).masked_fill_(k_col == 0, neg_inf)
        del top
        x.masked_fill_(x < kth, neg_inf)
    if any(p < 1.0 for p in top_p):  # keep the smallest prefix whose mass reaches top_p
        limits = [p if p < 1.0 else float("inf") for p in top_p]
        if device.type != "cpu":
            _top_p_by_sort(x, limits)
        elif rows := _top_p_from_candidates(x, limits):  # the rows whose nucleus is wider
            index = torch.tensor(rows)
            wide = x[index]
            _top_p_by_sort(wide, [limits[r] for r in rows])
            x[index] = wide
    if any(p > 0.0 for p in min_p):  # p / p_max = exp(x - max) below min_p
        ratio = torch.exp(x - x.amax(dim=-1, keepdim=True))
        x.masked_fill_(ratio < _row_values(list(min_p), device), neg_inf)
    return x


def _top_p_by_sort(x: torch.Tensor, limits: list[float]) -> None:
    """Top-p, in place, on every row of ``x`` (limit inf: none), sorting
    ``SAMPLER_SORT_ROWS`` rows at a time: a row keeps the values not below its smallest value
    whose strictly larger values hold at most ``limit`` of its mass (ties at the cut kept)."""
    for lo in range(0, x.shape[0], SAMPLER_SORT_ROWS):
        part = x[lo:lo + SAMPLER_SORT_ROWS]
        sorted_x = torch.sort(part, dim=-1, descending=True).values
        probs = torch.softmax(sorted_x, dim=-1)
        limit = _row_values(limits[lo:lo + len(part)], x.device)
        kept = ((probs.cumsum(dim=-1) - probs) <= limit).sum(dim=-1, keepdim=True)  # >= 1
        del probs
        part.masked_fill_(part < sorted_x.gather(1, kept - 1), float("-inf"))


#: top-p on the CPU first looks for each row's nucleus among this many top tokens
TOP_P_CANDIDATES = 256


def _top_p_from_candidates(x: torch.Tensor, limits: list[float]) -> list[int]:
    """Top-p, in place, for the rows of ``x`` whose nucleus lies within their
    ``TOP_P_CANDIDATES`` largest logits (a partial selection instead of sorting the whole
    vocabulary: on the CPU a 49k-token row took ~2.5 ms to sort); returns the other rows, which
    need the full sort. Only for the CPU: deciding which rows are done reads the device.
    A row is done when the mass of its candidates exceeds its limit, since every token past
    them then has more than the limit before it; its kept tokens are those not below the
    smallest kept candidate (tokens tied with it past the cut are kept too)."""
    k = min(TOP_P_CANDIDATES, x.shape[-1])
    values = torch.topk(x, k, dim=-1).values  # sorted, largest first
    probs = torch.exp(values - torch.logsumexp(x, dim=-1, keepdim=True))
    cum = probs.cumsum(dim=-1)
    limit = torch.tensor(limits, dtype=x.dtype)[:, None]
    kept = ((cum - probs) <= limit).sum(dim=-1, keepdim=True)  # >= 1: the first has 0 before it
    threshold = values.gather(1, kept - 1)
    done = cum[:, -1:] > limit
    x.masked_fill_(done & (x < threshold), float("-inf"))
    return [r for r, (d, lim) in enumerate(zip(done[:, 0].tolist(), limits, strict=True))
            if not d and lim != float("inf")]  # an infinite limit: top-p off for that row


#: on the CPU, rows with a top-k of at most this many tokens draw from their top-k alone
TOP_K_CANDIDATES = 1024


def _draw(logits: torch.Tensor, settings: np.ndarray, owned: bool = False) -> torch.Tensor:
    """One drawn token per row (int64 on the logits' device) under ``draw_settings`` rows whose
    temperature is > 0: the torch path, and the reference of ``kernels/triton/sampling.py``.
    Works on one float32 copy of the logits, in place (``planner.estimates.sampler_bytes``);
    ``owned``: ``logits`` is the caller's own copy, used as it is when it is float32. On the
    CPU, rows with a small top-k draw from their top-k candidates (``_draw_from_top_k``)."""
    device = logits.device
    x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=not owned)
    inverse = _row_values(settings[:, 1].tolist(), device)  # float32 1 / temperature
    if not isinstance(inverse, float) or inverse != 1.0:
        x.mul_(inverse)
    if device.type != "cpu":
        return _draw_filtered(x, settings)
    k = settings[:, 2]
    few = np.flatnonzero((k > 0) & (k <= TOP_K_CANDIDATES) & (k < x.shape[-1]))
    if not len(few):
        return _draw_filtered(x, settings)
    token = torch.empty(len(x), dtype=torch.int64)
    rest = _draw_from_top_k(x, few, settings, token)
    if rest:
        if len(rest) < len(x):
            x = x[torch.tensor(rest)]  # a gathered copy, in place of the whole one
        token[rest] = _draw_filtered(x, settings[rest])
    return token


def _draw_filtered(x: torch.Tensor, settings: np.ndarray) -> torch.Tensor:
    """``_draw`` over the whole vocabulary of ``x`` (temperature-scaled float32 logits, changed
    in place): the filters mask it, then the inverse CDF."""
    device = x.device
    _filter_rows(x, settings[:, 2].astype(np.int64).tolist(), settings[:, 3].tolist(),
                 settings[:, 4].tolist())
    # inverse CDF: the first token whose cumulative mass passes u * total, u uniform in [0, 1)
    # (an exact draw; a filtered token adds no mass, so it is never picked). One uniform a row,
    # where exponential noise over the vocabulary (argmax(probs / noise)) drew one per token:
    # ~1.5 ms a row at a 49k vocabulary on a 2-core CPU.
    cdf = torch.softmax(x, dim=-1)
    del x
    cdf.cumsum_(dim=-1)
    u = host_values(np.ascontiguousarray(settings[:, 5]), torch.float32, device)[:, None]
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    return token.clamp_(max=cdf.shape[-1] - 1)


def _draw_from_top_k(x: torch.Tensor, few: np.ndarray, settings: np.ndarray,
                     token: torch.Tensor) -> list[int]:
    """On the CPU, the draws of the rows ``few`` of ``x`` (top-k of at most
    ``TOP_K_CANDIDATES``) from their largest ``max k + 1`` logits alone, written into
    ``token``: top-k, top-p (on the mass top-k leaves) and min-p mask the candidates, and the
    inverse CDF runs over them in vocabulary order. Returns the rows left to the full path:
    the others, and those whose k-th value ties with a token past the candidates. Where the
    full path took a softmax and sorts over the whole vocabulary (top-k 40 + top-p 0.9 at 64
    rows of 49,152: ~40 ms on a 2-core CPU), this takes one ``topk``. The sums are sequential
    (``cumsum``) and unnormalised, so a row draws the same alone or in any batch."""
    index = torch.from_numpy(few)
    sub = x if len(few) == len(x) else x[index]
    s = settings[few]
    ks = torch.from_numpy(s[:, 2].astype(np.int64))[:, None]
    vals, ids = torch.topk(sub, int(ks.max()) + 1, dim=-1)  # largest first
    kth = vals.gather(1, ks - 1)
    complete = (vals[:, -1:] < kth)[:, 0]  # every token at or above kth is a candidate
    e = torch.exp(vals - vals[:, :1])  # p / p_max; the first is the row's maximum
    e.masked_fill_(vals < kth, 0.0)
    if (s[:, 3] < 1.0).any():  # keep the values not below the first whose mass before ...
        limit = torch.from_numpy(np.where(s[:, 3] < 1.0, s[:, 3], np.inf).astype(np.float32))
        cum = e.cumsum(dim=-1)
        kept = ((cum - e) <= limit[:, None] * cum[:, -1:]).sum(dim=-1, keepdim=True)  # >= 1
        e.masked_fill_(vals < vals.gather(1, kept - 1), 0.0)  # ... passes top_p (ties kept)
    if (s[:, 4] > 0.0).any():
        e.masked_fill_(e < torch.from_numpy(s[:, 4])[:, None], 0.0)
    order = ids.argsort(dim=-1)  # the inverse CDF in vocabulary order
    e = e.gather(1, order).cumsum_(dim=-1)
    u = torch.from_numpy(np.ascontiguousarray(s[:, 5]))[:, None]
    at = torch.searchsorted(e, u * e[:, -1:], right=True).clamp_(max=e.shape[-1] - 1)
    done = complete.nonzero()[:, 0]
    token[index[done]] = ids.gather(1, order.gather(1, at))[done, 0]
    rest = np.ones(len(x), dtype=bool)
    rest[few[done.numpy()]] = False
    return np.flatnonzero(rest).tolist()


def draw_settings(items: Sequence[ScheduledSeq], generator: torch.Generator | None = None,
                  ahead: int = 0) -> np.ndarray:
    """Each row's draw settings, ``[rows, 6]`` float32 in the columns of
    ``kernels/triton/sampling.SETTINGS``: temperature (0: greedy), its inverse as float32,
    top_k (0: off), top_p, min_p, and the row's uniform (``uniforms``; drawn for the rows with
    a temperature only, so greedy rows take nothing from ``generator``)."""
    settings = np.zeros((len(items), 6), dtype=np.float32)
    drawn = []
    for r, it in enumerate(items):
        p = it.params
        if p.temperature != 0.0:
            drawn.append(r)
            settings[r, :5] = (p.temperature, 1.0 / p.temperature, max(p.top_k, 0), p.top_p,
                               p.min_p)
    if drawn:
        settings[drawn, 5] = uniforms([items[r] for r in drawn], generator, ahead)
    return settings


_M64 = (1 << 64) - 1
_U24 = 1.0 / (1 << 24)


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a well-spread 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def uniforms(items: Sequence[ScheduledSeq], generator: torch.Generator | None = None,
             ahead: int = 0) -> np.ndarray:
    """Each row's uniform in [0, 1) for its draw (float32, 24 random bits: exact in float32
    and below 1), made on the host: a seeded row's is a hash of (seed, token index), the same
    on every device and in every batch; the other rows' come from ``generator`` (a CPU
    ``torch.Generator``; None: torch's default one) in one call."""
    u = np.empty(len(items), dtype=np.float32)
    free = []
    for r, it in enumerate(items):
        seed = it.params.seed
        if seed is None:
            free.append(r)
        else:
            u[r] = (_mix64(seed * _SEED_STRIDE + it.num_generated + ahead) >> 40) * _U24
    if free:
        bits = torch.randint(0, 1 << 24, (len(free),), generator=generator, dtype=torch.int64)
        u[free] = bits.numpy() * _U24
    return u


def choose(logits: torch.Tensor, items: Sequence[ScheduledSeq],
           generator: torch.Generator | None = None, ahead: int = 0,
           greedy: torch.Tensor | None = None, pending: torch.Tensor | None = None) -> torch.Tensor:
    """The token of each row as a tensor on the logits' device (penalties, temperature, filters,
    the seeded draw) without waiting for the device; ``sample`` reads it and adds logprobs, and
    ``runner/decode_ahead.py`` feeds it to the next step before the host has seen it (``ahead``:
    the rows are that many tokens past ``items``, which keys their seeded draws).
    ``greedy``: each row's argmax if already computed (a decode graph's output,
    ``runner/cuda_graphs.py``); the result may then be that tensor, its drawn rows overwritten.
    ``pending``: ``[rows, ahead]`` device tokens the rows generated past their ``history``,
    which the penalties count (a step launched ahead of the host)."""
    # Logits may come in the model dtype (the cuBLAS LM head on CUDA, ``ops.logits``): greedy
    # rows take the argmax as they are (float32 holds every bf16/fp16 value exactly, so the
    # maximum and its first index are the same), the rest is computed in float32.
    if any(len(it.history) for it in items):
        logits = penalised(logits, items, pending)
        greedy = None  # the penalties move the maximum
    drawn = [r for r, it in enumerate(items) if it.params.temperature != 0.0]
    if not drawn:  # = argmax (first maximum); max().indices is ~2x faster on the CPU
        return logits.max(dim=-1).indices if greedy is None else greedy
    settings = draw_settings(items, generator, ahead)
    kernel = ops.draw_kernel(logits) if KERNEL and len(items) >= KERNEL_MIN_ROWS else None
    if kernel is not None:  # every row in one kernel, the greedy ones included
        return kernel(logits, host_values(settings, torch.float32, logits.device), out=greedy)
    if len(drawn) == len(items):
        tokens = _draw(logits, settings)
        return tokens if greedy is None else greedy.copy_(tokens)
    chosen = logits.max(dim=-1).indices if greedy is None else greedy
    index = device_index(drawn, logits.device)
    chosen[index] = _draw(logits[index], settings[drawn], owned=True)  # a gathered copy
    return chosen


def logprobs(logits: torch.Tensor, tokens: torch.Tensor,
             items: Sequence[ScheduledSeq]) -> tuple[torch.Tensor, ...] | None:
    """On the logits' device, without waiting: each row's logprob of its chosen ``tokens`` in
    the model's raw distribution (log_softmax of the unprocessed logits, as vLLM returns by
    default) and, when some row asks for alternatives, the largest ``max(logprobs)`` logprobs
    and their ids; None when no row asks for logprobs (``sampled_tokens`` reads them)."""
    wanted = [it.params.logprobs for it in items]
    if all(k is None for k in wanted):
        return None
    return token_logprobs(logits, tokens, max(k or 0 for k in wanted))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, ...]:
    """Each row's raw logprob of ``tokens`` (float32 ``[rows]``) and, with ``k`` > 0, its ``k``
    largest logprobs and their ids: the Triton kernels on CUDA (``kernels/triton/logprobs.py``),
    else ``_logprobs``. Also the prompt logprobs' scoring (``runner/model_runner.py``)."""
    kernel = ops.logprobs_kernel(logits) if KERNEL else None
    return (kernel or _logprobs)(logits, tokens, k)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """``logprobs``' torch path (the CPU's, and the reference of ``kernels/triton/logprobs.py``):
    a float32 log-softmax of every row, the chosen tokens' entries and its ``k`` largest."""
    raw = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    chosen = raw.gather(1, tokens[:, None])[:, 0]
    if not k:
        return (chosen,)
    top_vals, top_ids = torch.topk(raw, k, dim=-1)
    return chosen, top_vals, top_ids


def sampled_tokens(items: Sequence[ScheduledSeq], tokens: list[int],
                   lps: list[list] | None = None) -> list[SampledToken]:
    """The rows' ``SampledToken``s from their tokens and, when ``logprobs`` made them, its
    tensors as lists (``tolist()``); a row that asked for ``k`` alternatives gets its top k."""
    if lps is None:
        return [SampledToken(it.seq_id, t) for it, t in zip(items, tokens, strict=True)]
    chosen, *top = lps
    if not top:  # no row asked for alternatives
        return [SampledToken(it.seq_id, t) if it.params.logprobs is None
                else SampledToken(it.seq_id, t, c, ())
                for it, t, c in zip(items, tokens, chosen, strict=True)]
    vals, ids = top
    kmax = len(ids[0])
    out = []
    for it, t, c, row_ids, row_vals in zip(items, tokens, chosen, ids, vals, strict=True):
        k = it.params.logprobs
        if k is None:
            out.append(SampledToken(it.seq_id, t))
        else:  # (id, logprob) pairs; no slicing when the row asked for the most there are
            if k != kmax:
                row_ids, row_vals = row_ids[:k], row_vals[:k]
            out.append(SampledToken(it.seq_id, t, c, tuple(zip(row_ids, row_vals, strict=False))))
    return out


def sample(logits: torch.Tensor, items: Sequence[ScheduledSeq],
           generator: torch.Generator | None = None) -> list[SampledToken]:
    """Pick one token per row; ``items[i]`` holds the sampling settings of row i (``logits``
    in float32 or the model dtype; no float32 copy of them is made here)."""
    tokens = choose(logits, items, generator)
    lps = logprobs(logits, tokens, items)
    return sampled_tokens(items, tokens.tolist(),
                          None if lps is None else [t.tolist() for t in lps])
