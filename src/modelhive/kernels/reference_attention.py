"""Paged attention and the K/V store in plain PyTorch (``reference.store_kv`` and
``reference.paged_attention``, whose contracts ``reference.py`` states): the CPU serving path and
the reference the Triton attention kernels are tested against.

Decodes gather whole blocks of K/V per layer; one decode attends with float32 ``bmm`` per kv
head; a step's whole prompts attend as one causal SDPA over a padded batch; other chunks attend
one sequence at a time. Things derived from a step's metadata are built once per step and shared
by all layers (``_per_step``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from modelhive.runner.attn_metadata import AttentionMetadata


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    meta: AttentionMetadata,
) -> None:
    index = (meta.slot_blocks, meta.slot_offsets)
    k_cache[index] = k if k.dtype == k_cache.dtype else k.to(k_cache.dtype)
    v_cache[index] = v if v.dtype == v_cache.dtype else v.to(v_cache.dtype)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """q [B, H, Q, D], k/v [B, KVH, L, D], mask [B, 1, Q, L] (True = attend) -> [B, H, Q, D]."""
    group = q.shape[1] // k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=group > 1)
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def _decode_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMetadata, scale: float, sliding_window: int | None,
                   softcap: float | None) -> torch.Tensor:
    """The decodes' attention (one query per sequence): q ``[D, H, Dh]`` -> ``[D, H, Dh]``.

    K and V are read as whole blocks (``meta.decode_blocks``: one ``index_select`` each, keys
    ``[D, nb * T, KVH * Dh]``), past-the-end and out-of-window keys get -inf from
    ``meta.decode_bias``. GQA without repeating K/V: each query head is laid into a zero row
    ``[KVH * Dh]`` at its kv head's slot, so one batched GEMM gives every head's scores against
    its own kv head (the other kv heads' products are exact zeros); the output keeps each head's
    own slot. Scores are float32 (softmax in float32, probabilities back in the cache dtype, as
    transformers' eager attention computes them). On this 2-core CPU that is ~5x faster than
    gathering token by token and attending with grouped einsums at 64 sequences.
    """
    d, h, dh = q.shape
    kvh = k_cache.shape[2]
    g = h // kvh
    blocks, nb = meta.decode_blocks
    length = nb * k_cache.shape[1]
    k = torch.index_select(k_cache, 0, blocks).view(d, length, kvh * dh)
    v = torch.index_select(v_cache, 0, blocks).view(d, length, kvh * dh)
    if kvh == 1:
        q_wide = q.to(k.dtype)
    else:
        q_wide = q.new_zeros(d, kvh, g, kvh, dh, dtype=k.dtype)
        torch.diagonal(q_wide, dim1=1, dim2=3).copy_(q.view(d, kvh, g, dh).permute(0, 2, 3, 1))
        q_wide = q_wide.view(d, h, kvh * dh)
    scores = torch.bmm(q_wide, k.transpose(1, 2))  # [D, H, L]
    bias = meta.decode_bias(sliding_window)
    if softcap is None:
        scores = torch.add(bias, scores, alpha=scale)
    else:
        scores = torch.tanh(scores.float() * (scale / softcap)) * softcap + bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.bmm(probs, v)  # [D, H, KVH * Dh]
    if kvh == 1:
        return out
    out = torch.diagonal(out.view(d, kvh, g, kvh, dh), dim1=1, dim2=3)  # [D, G, Dh, KVH]
    return out.permute(0, 3, 1, 2).reshape(d, h, dh)


def _decode_attend_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One decode without softcap or window, q ``[1, H, Dh]``: its blocks gathered
    (``meta.decode_blocks`` is exactly its table for one decode), the keys cut to its length,
    and the two products as float32 ``bmm`` per kv head (``[KVH, G, Dh] @ [KVH, Dh, n]``; q's
    heads are kv-major, so the views need no copy). Ten small ops, ~4x faster on this CPU than
    SDPA's flash kernel for one query; a bfloat16 ``bmm`` of this size costs ~20 us of fixed
    overhead where float32 takes ~4 us. Scores and probabilities stay float32 (more exact than
    the batched path, which rounds scores to the cache dtype)."""
    _, h, dh = q.shape
    kvh = k_cache.shape[2]
    n = meta.seq_lens_host[0]
    blocks, _ = meta.decode_blocks
    k = torch.index_select(k_cache, 0, blocks).view(-1, kvh, dh)[:n].float()  # [n, KVH, Dh]
    v = torch.index_select(v_cache, 0, blocks).view(-1, kvh, dh)[:n].float()
    scores = torch.bmm(q.reshape(kvh, h // kvh, dh).float(), k.permute(1, 2, 0))  # [KVH, G, n]
    probs = torch.softmax(scores.mul_(scale), dim=-1)
    return torch.bmm(probs, v.transpose(0, 1)).view(1, h, dh).to(q.dtype)


class _PromptBatch(NamedTuple):
    """This step's whole prompts (sequences with nothing cached before the step), laid out as one
    padded batch ``[S, Lmax]`` (``rows``: the token row of each slot, padding repeats a prompt's
    last token) for one causal SDPA; ``(out_seq, out_pos)`` pick the real slots of its output in
    token order, ``token_rows`` are those tokens' rows in the step."""

    seqs: tuple[int, ...]
    others: tuple[int, ...]  # the step's other non-decode sequences (chunks after cached tokens)
    rows: torch.Tensor  # [S, Lmax] int64
    slot_blocks: torch.Tensor  # [S, Lmax] int64: pool block of each slot's token
    slot_offsets: torch.Tensor  # [S, Lmax] int64
    out_seq: torch.Tensor  # [tokens] int64
    out_pos: torch.Tensor  # [tokens] int64
    token_rows: torch.Tensor  # [tokens] int64


#: (metadata, {key: value}) of the last step: things derived from a step's metadata once and
#: shared by all layers (the metadata object is per step; a new one starts a new cache)
_step_cache: tuple[object, dict] = (None, {})


def _per_step(meta: AttentionMetadata, key: str, make):
    global _step_cache
    cache = _step_cache
    if cache[0] is not meta:
        cache = (meta, {})
        _step_cache = cache
    if key not in cache[1]:
        cache[1][key] = make(meta)
    return cache[1][key]


def _prompt_batch(meta: AttentionMetadata) -> _PromptBatch | None:
    return _per_step(meta, "prompts", _make_prompt_batch)


def _make_prompt_batch(meta: AttentionMetadata) -> _PromptBatch | None:
    """None unless at least two whole prompts share the step and padding them to the longest at
    most doubles their tokens (one long prompt with short ones takes the per-sequence path)."""
    qsl, lens = meta.query_start_loc_host, meta.seq_lens_host
    seqs = tuple(s for s in range(meta.num_decodes, meta.num_seqs)
                 if lens[s] == qsl[s + 1] - qsl[s])
    if len(seqs) < 2:
        return None
    longest = max(lens[s] for s in seqs)
    tokens = sum(lens[s] for s in seqs)
    if len(seqs) * longest > 2 * tokens:
        return None
    rows = [qsl[s] + min(i, lens[s] - 1) for s in seqs for i in range(longest)]
    out_seq = [j for j, s in enumerate(seqs) for _ in range(lens[s])]
    out_pos = [i for s in seqs for i in range(lens[s])]
    token_rows = [t for s in seqs for t in range(qsl[s], qsl[s + 1])]
    device = meta.positions.device
    rows_t = torch.tensor(rows, dtype=torch.long, device=device).view(len(seqs), longest)
    batched = set(seqs)
    others = tuple(s for s in range(meta.num_decodes, meta.num_seqs) if s not in batched)
    return _PromptBatch(seqs, others, rows_t, meta.slot_blocks[rows_t], meta.slot_offsets[rows_t],
                        torch.tensor(out_seq, dtype=torch.long, device=device),
                        torch.tensor(out_pos, dtype=torch.long, device=device),
                        torch.tensor(token_rows, dtype=torch.long, device=device))


def _attend_prompts(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    prompts: _PromptBatch, scale: float) -> torch.Tensor:
    """Causal attention of whole prompts as ONE SDPA call over a padded batch: ``q`` rows and
    the prompts' keys/values (read back from the pool slots this step stored them in) gathered
    into ``[S, Lmax]``; with ``is_causal`` a real query only sees real keys (padding comes after
    every real position), and padded queries are dropped. Returns ``[tokens, H, Dh]`` for
    ``prompts.token_rows``. On this 2-core CPU: one call instead of one mask, two gathers and
    one SDPA per prompt and layer (~4x less attention time for 64 prompts of ~15 tokens)."""
    s, longest = prompts.rows.shape
    _, h, dh = q.shape
    kvh = k_cache.shape[2]
    qp = torch.index_select(q, 0, prompts.rows.view(-1)).view(s, longest, h, dh).transpose(1, 2)
    kp = k_cache[prompts.slot_blocks, prompts.slot_offsets].transpose(1, 2)  # [S, KVH, L, Dh]
    vp = v_cache[prompts.slot_blocks, prompts.slot_offsets].transpose(1, 2)
    o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                       enable_gqa=kvh != h)  # [S, H, L, Dh]
    del qp, kp, vp  # the activation peak: only o and the result below
    return o[prompts.out_seq, :, prompts.out_pos]  # [tokens, H, Dh]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    d = meta.num_decodes
    if d:
        if d == 1 and softcap is None and sliding_window is None:
            decoded = _decode_attend_one(q[:d], k_cache, v_cache, meta, scale)
        else:
            decoded = _decode_attend(q[:d], k_cache, v_cache, meta, scale, sliding_window,
                                     softcap)
        if d == meta.num_seqs:  # a decode-only step: no output buffer to fill
            return decoded
    prompts = (_prompt_batch(meta) if softcap is None and sliding_window is None
               and q.device.type == "cpu" else None)
    if prompts is not None and not d and len(prompts.seqs) == meta.num_seqs:
        return _attend_prompts(q, k_cache, v_cache, prompts, scale)  # only whole prompts
    out = torch.empty_like(q)
    if d:
        out[:d] = decoded
    others: Iterable[int] = range(d, meta.num_seqs)
    if prompts is not None:
        out[prompts.token_rows] = _attend_prompts(q, k_cache, v_cache, prompts, scale)
        others = prompts.others
    qsl = meta.query_start_loc_host
    T = meta.tokens_per_block
    for s in others:
        start, end = qsl[s], qsl[s + 1]
        seq_len = meta.seq_lens_host[s]
        q_len = end - start
        key_pos = torch.arange(seq_len, device=q.device)
        blocks = meta.block_tables[s].long()[key_pos // T]
        k = k_cache[blocks, key_pos % T]  # [L, KVH, Dh]
        v = v_cache[blocks, key_pos % T]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = key_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
        if sliding_window is not None:
            mask &= key_pos.unsqueeze(0) > (q_pos.unsqueeze(1) - sliding_window)
        o = _attend(q[start:end].transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                    v.transpose(0, 1).unsqueeze(0), mask[None, None], scale, softcap)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out
