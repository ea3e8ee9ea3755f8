"""Rotate-half RoPE on ``[N, heads, D]``, one program per token for all its heads; and RoPE fused
with store-KV (``rope_store_kv``: q rotated in place, k rotated and v written to the pool).

Contract (``reference.apply_rope``): angles ``positions[n] * inv_freq`` in float32; cos and sin
(times ``attention_scaling``) are cast to ``x.dtype`` and each product and sum is rounded to
``x.dtype`` as the reference's elementwise ops are, so bf16 results match it bit for bit up to the
last ulp of cos/sin. Returns a new contiguous tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from modelhive.kernels.triton import pdl
from modelhive.runner.attn_metadata import AttentionMetadata


@triton.jit
def _rotate(x1, x2, cos, sin, dtype: tl.constexpr):
    """Rotate-half on float32 halves, each product and sum rounded to ``dtype`` (the reference's
    elementwise ops)."""
    o1 = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
    return o1, o2


@triton.jit
def _cos_sin(pos_ptr, inv_freq_ptr, n, i, i_mask, scaling, dtype: tl.constexpr):
    """cos and sin of token ``n``'s angles for frequencies ``i`` (float32 angle, times
    ``scaling``, rounded to ``dtype`` as the reference's tables are), as float32 ``[1, len(i)]``."""
    pos = tl.load(pos_ptr + n).to(tl.float32)
    angle = pos * tl.load(inv_freq_ptr + i, mask=i_mask, other=0.0)
    cos = (libdevice.cos(angle) * scaling).to(dtype).to(tl.float32)[None, :]
    sin = (libdevice.sin(angle) * scaling).to(dtype).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rope_kernel(
    x_ptr, pos_ptr, inv_freq_ptr, out_ptr, stride_xn, stride_xh, num_heads, scaling,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    n = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    cos, sin = _cos_sin(pos_ptr, inv_freq_ptr, n, i, i_mask, scaling, dtype)
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < num_heads) & i_mask[None, :]
    src = x_ptr + n.to(tl.int64) * stride_xn + h * stride_xh + i[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    o1, o2 = _rotate(x1, x2, cos, sin, dtype)
    dst = out_ptr + (n.to(tl.int64) * num_heads + h) * (2 * HALF) + i[None, :]
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               attention_scaling: float = 1.0) -> torch.Tensor:
    num_tokens, num_heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    half = head_dim // 2
    block_h = triton.next_power_of_2(num_heads)
    block_half = triton.next_power_of_2(half)
    _rope_kernel[(num_tokens,)](
        x, positions, inv_freq, out, x.stride(0), x.stride(1), num_heads,
        float(attention_scaling), HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=1 if block_h * block_half <= 256 else 4,
    )
    return out


#: query heads per program of ``rope_store_kv`` (the k/v program runs beside them): at batch 1 a
#: single program rotating all 32 heads and then storing k and v took ~3.5 us (H200)
ROPE_Q_HEADS_PER_PROGRAM = 8


@triton.jit
def _rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, k_cache_ptr, v_cache_ptr,
    slot_blocks_ptr, slot_offsets_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_cb, stride_ct, stride_ch, num_heads, num_kv_heads, scaling,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr, PDL_EARLY: tl.constexpr,
):
    n = tl.program_id(0)
    n64 = n.to(tl.int64)
    dtype = q_ptr.dtype.element_ty
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    # positions and slots are staged before the step starts: read them (and compute cos/sin)
    # before waiting for the kernel that produced q, k and v (pdl.py)
    cos, sin = _cos_sin(pos_ptr, inv_freq_ptr, n, i, i_mask, scaling, dtype)
    block = tl.load(slot_blocks_ptr + n).to(tl.int64)
    offset = tl.load(slot_offsets_ptr + n).to(tl.int64)
    pdl.wait(USE_PDL, PDL_EARLY)
    part = tl.program_id(1)  # 0: k and v; p > 0: query heads [(p - 1) BLOCK_H, p BLOCK_H)
    if part > 0:  # q: rotated in place
        h = (part - 1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        mask = (h < num_heads) & i_mask[None, :]
        src = q_ptr + n64 * stride_qn + h * stride_qh + i[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        q1, q2 = _rotate(x1, x2, cos, sin, dtype)  # names unlike the else branch's: Triton
        tl.store(src, q1, mask=mask)  # makes a name set in both branches an if-result, whose
        tl.store(src + HALF, q2, mask=mask)  # shapes would have to match
    else:  # k rotated, and v, into the pool (a negative block id skips the token: padding)
        g = tl.arange(0, BLOCK_KV)[:, None]
        kv_mask = (g < num_kv_heads) & i_mask[None, :] & (block >= 0)
        k_src = k_ptr + n64 * stride_kn + g * stride_kh + i[None, :]
        v_src = v_ptr + n64 * stride_vn + g * stride_vh + i[None, :]
        k1 = tl.load(k_src, mask=kv_mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_src + HALF, mask=kv_mask, other=0.0).to(tl.float32)
        v1 = tl.load(v_src, mask=kv_mask, other=0.0)
        v2 = tl.load(v_src + HALF, mask=kv_mask, other=0.0)
        o1, o2 = _rotate(k1, k2, cos, sin, dtype)
        dst = block * stride_cb + offset * stride_ct + g * stride_ch + i[None, :]
        cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + dst, o1.to(cache_dtype), mask=kv_mask)
        tl.store(k_cache_ptr + dst + HALF, o2.to(cache_dtype), mask=kv_mask)
        tl.store(v_cache_ptr + dst, v1.to(cache_dtype), mask=kv_mask)
        tl.store(v_cache_ptr + dst + HALF, v2.to(cache_dtype), mask=kv_mask)


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, attention_scaling: float = 1.0) -> torch.Tensor:
    """One launch: q rotated in place (returned), k rotated and v written to the pool views
    (``reference.rope_store_kv``; the store follows ``store_kv``'s contract)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if q.stride(-1) != 1:
        raise ValueError("rope_store_kv rotates q in place: its last dim must be contiguous")
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if num_tokens == 0:
        return q
    half = head_dim // 2
    block_h = min(triton.next_power_of_2(num_heads), ROPE_Q_HEADS_PER_PROGRAM)
    block_half = triton.next_power_of_2(half)
    grid = (num_tokens, 1 + triton.cdiv(num_heads, block_h))  # k/v, then groups of q heads
    use_pdl = pdl.enabled(q)
    _rope_store_kv_kernel[grid](
        q, k, v, positions, inv_freq, k_cache, v_cache, meta.slot_blocks, meta.slot_offsets,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_heads, num_kv_heads,
        float(attention_scaling), HALF=half, BLOCK_H=block_h,
        BLOCK_KV=triton.next_power_of_2(num_kv_heads), BLOCK_HALF=block_half,
        USE_PDL=use_pdl, PDL_EARLY=pdl.EARLY, launch_pdl=use_pdl,
        num_warps=1 if block_h * block_half <= 256 else 4,
    )
    return q
