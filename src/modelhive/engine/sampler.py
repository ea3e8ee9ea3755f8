"""Sampler: logits [rows, vocab] (float32) -> one token per row, plus optional logprobs.

Order of processing (vLLM's): penalties (repetition, presence, frequency) -> temperature ->
top-k -> top-p -> min-p -> draw. Greedy rows (temperature 0) take the argmax of the penalised
logits. Logprobs are those of the model's raw distribution (log_softmax of the unprocessed logits),
as vLLM returns by default.

Seeded rows are reproducible whatever shares their batch, and across preemption: the draw for the
i-th generated token uses exponential noise from a generator seeded by (seed, i), and picks
``argmax(probs / noise)`` (an exact sample from ``probs``). Unseeded rows draw from ``generator``.
"""

from __future__ import annotations

import torch

from modelhive.engine.sequence import SampledToken, ScheduledSeq

_SEED_STRIDE = 1_000_003


def _apply_penalties(logits: torch.Tensor, items: list[ScheduledSeq]) -> None:
    for row, item in enumerate(items):
        p = item.params
        if not item.history:
            continue
        history = torch.tensor(item.history, dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1.0:
            seen = torch.unique(history)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                            vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = history[item.num_prompt_tokens:]
            if out.numel():
                counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
                logits[row] -= p.frequency_penalty * counts
                logits[row] -= p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k / top-p / min-p for one row of temperature-scaled logits."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        drop = (cum - probs) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def choose(logits: torch.Tensor, items: list[ScheduledSeq],
           generator: torch.Generator | None = None, ahead: int = 0,
           greedy: torch.Tensor | None = None) -> torch.Tensor:
    """The token of each row as a tensor on the logits' device (penalties, temperature, filters,
    the seeded draw) without waiting for the device; ``sample`` reads it and adds logprobs, and
    ``runner/decode_ahead.py`` feeds it to the next step before the host has seen it (``ahead``:
    the rows are that many tokens past ``items``, which keys their seeded draws).
    ``greedy``: each row's argmax if already computed (a decode graph's output,
    ``runner/cuda_graphs.py``); the result may then be that tensor, its drawn rows overwritten."""
    # Logits may come in the model dtype (the cuBLAS LM head on CUDA, ``ops.logits``): greedy
    # rows take the argmax as they are (float32 holds every bf16/fp16 value exactly, so the
    # maximum and its first index are the same), the rest is computed in float32.
    if any(it.history for it in items):
        logits = logits.to(torch.float32, copy=True)
        _apply_penalties(logits, items)
        greedy = None  # the penalties move the maximum
    # = argmax (first maximum); max().indices is ~2x faster on the CPU
    chosen = logits.max(dim=-1).indices if greedy is None else greedy
    for row, item in enumerate(items):
        p = item.params
        if p.temperature == 0.0:
            continue
        row_logits = _filter(logits[row].float() / p.temperature, p.top_k, p.top_p, p.min_p)
        probs = torch.softmax(row_logits, dim=-1)
        if p.seed is not None:
            g = torch.Generator(device=logits.device)
            g.manual_seed((p.seed * _SEED_STRIDE + item.num_generated + ahead) % (2**63))
            noise = torch.empty_like(probs).exponential_(generator=g)
        else:
            noise = torch.empty_like(probs).exponential_(generator=generator)
        chosen[row] = torch.argmax(probs / noise)
    return chosen


def sample(logits: torch.Tensor, items: list[ScheduledSeq],
           generator: torch.Generator | None = None) -> list[SampledToken]:
    """Pick one token per row; ``items[i]`` holds the sampling settings of row i."""
    logits = logits.float()
    want_logprobs = any(it.params.logprobs is not None for it in items)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    chosen: list[int] = choose(logits, items, generator).tolist()
    out = []
    for row, item in enumerate(items):
        token = chosen[row]
        logprob = top = None
        if raw_logprobs is not None and item.params.logprobs is not None:
            logprob = float(raw_logprobs[row, token])
            k = item.params.logprobs
            if k > 0:
                vals, ids = torch.topk(raw_logprobs[row], k)
                top = tuple(zip(ids.tolist(), vals.tolist(), strict=True))
            else:
                top = ()
        out.append(SampledToken(item.seq_id, token, logprob, top))
    return out
