"""Plain-PyTorch kernels: the CPU path, and the reference every GPU kernel is tested against.

Contracts (shared with ``kernels/triton/*``):
- ``store_kv(k_cache, v_cache, k, v, meta)``: writes the step's new keys/values ``[N, kv_heads, D]``
  into the pool views ``[num_blocks, T, kv_heads, D]`` at ``(meta.slot_blocks, meta.slot_offsets)``.
- ``paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, softcap)``: ``q`` is
  ``[N, heads, D]``; returns ``[N, heads, D]``. Each query at position p attends to the keys of its
  own sequence at positions ``k <= p`` (and ``k > p - sliding_window`` when a window is given), read
  from the pool through the block table. GQA: query head h uses kv head ``h // (heads // kv_heads)``.
- ``rms_norm(x, weight, eps, offset)``: ``x / rms(x) * (offset + weight)``, computed in float32.
- ``apply_rope(x, positions, inv_freq)``: rotate-half RoPE on ``[N, heads, D]``.
- ``rope_store_kv(q, k, v, positions, inv_freq, k_cache, v_cache, meta)``: RoPE on q and k, the
  rotated k and v stored as ``store_kv`` does; returns the rotated q (the GPU kernel rotates ``q``
  in place and returns it: callers must not reuse the unrotated ``q``).
- ``silu_and_mul(x)``: ``silu(x[..., :I]) * x[..., I:]`` for the fused gate_up output.

Fused linears (x ``[M, K]``, weight ``[N, K]`` as ``nn.Linear``; the pre-norm decoder's residual
stream ``h`` is updated by the two ``*_add`` ops, so no separate add or norm runs between them):
- ``norm_linear(x, norm_weight, eps, offset, weight, bias)``: ``linear(rms_norm(x), weight, bias)``.
- ``linear_add(x, weight, residual)``: ``residual + x @ weight.T``.
- ``act_linear_add(x, act, weight, residual)``: ``residual + act_and_mul(x) @ weight.T`` with
  ``act`` "silu" or "gelu_tanh" (x is the fused gate_up output ``[M, 2K]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modelhive.runner.attn_metadata import AttentionMetadata


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    meta: AttentionMetadata,
) -> None:
    k_cache[meta.slot_blocks, meta.slot_offsets] = k.to(k_cache.dtype)
    v_cache[meta.slot_blocks, meta.slot_offsets] = v.to(v_cache.dtype)


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


def _decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   scale: float, softcap: float | None) -> torch.Tensor:
    """One query per sequence. q [D, H, Dh], k/v [D, L, KVH, Dh], mask [D, L] -> [D, H, Dh].

    Few sequences: scaled_dot_product_attention. More: two einsums with the query heads grouped
    by kv head (no K/V repeat) and a float32 softmax, as transformers' eager attention computes
    it; on this 2-core CPU that is ~5x faster than SDPA with a mask at 64 sequences (and SDPA is
    faster below 4).
    """
    d, h, dh = q.shape
    kvh = k.shape[2]
    if d < 4 and softcap is None:
        return _attend(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                       mask[:, None, None, :], scale, None).squeeze(2)
    scores = torch.einsum("dkgh,dlkh->dkgl", q.view(d, kvh, h // kvh, dh), k) * scale
    scores = scores.float()
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("dkgl,dlkh->dkgh", probs, v).reshape(d, h, dh)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d:
        blocks, offsets, key_pos = meta.decode_gather
        k = k_cache[blocks, offsets]  # [D, L, KVH, Dh]
        v = v_cache[blocks, offsets]
        out[:d] = _decode_attend(q[:d], k, v, meta.decode_mask(sliding_window), scale, softcap)
    qsl = meta.query_start_loc_host
    T = meta.tokens_per_block
    for s in range(d, meta.num_seqs):
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """``x / rms(x) * (offset + weight)`` in float32 (torch's fused ``rms_norm``: the same
    arithmetic as the written-out form, one kernel instead of six on the CPU)."""
    if offset == 0.0 and weight.dtype == x.dtype:  # the fused op upcasts to float32 inside
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), offset + weight.float(), eps).to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               attention_scaling: float = 1.0) -> torch.Tensor:
    """Rotate-half RoPE. x [N, heads, D], positions [N], inv_freq [D/2] (float32)."""
    return rotate_half_rope(x, *rope_cos_sin(positions, inv_freq, x.dtype, attention_scaling))


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, attention_scaling: float = 1.0,
                  cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RoPE on q and k, k and v into the pool; returns the rotated q. ``cos_sin``: this step's
    ``rope_cos_sin`` when the caller computed it once for all layers."""
    cos, sin = cos_sin or rope_cos_sin(positions, inv_freq, q.dtype, attention_scaling)
    store_kv(k_cache, v_cache, rotate_half_rope(k, cos, sin), v, meta)
    return rotate_half_rope(q, cos, sin)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[N, 1, D/2]`` in ``dtype`` (computed in float32, as transformers does)."""
    freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # [N, D/2]
    return ((freqs.cos() * attention_scaling).to(dtype).unsqueeze(1),
            (freqs.sin() * attention_scaling).to(dtype).unsqueeze(1))


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.gelu(x[..., :half], approximate="tanh") * x[..., half:]


ACT_AND_MUL = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(rms_norm(x, norm_weight, eps, offset), weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + x @ weight.T`` as one GEMM with the add in its epilogue (beta = 1)."""
    return torch.addmm(residual, x, weight.t())


def act_linear_add(x: torch.Tensor, act: str, weight: torch.Tensor,
                   residual: torch.Tensor) -> torch.Tensor:
    return torch.addmm(residual, ACT_AND_MUL[act](x), weight.t())
