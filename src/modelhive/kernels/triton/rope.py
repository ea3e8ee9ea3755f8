"""Rotate-half RoPE on ``[N, heads, D]``, one program per token for all its heads.

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


@triton.jit
def _rope_kernel(
    x_ptr, pos_ptr, inv_freq_ptr, out_ptr, stride_xn, stride_xh, num_heads, scaling,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    n = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    pos = tl.load(pos_ptr + n).to(tl.float32)
    angle = pos * tl.load(inv_freq_ptr + i, mask=i_mask, other=0.0)
    cos = (libdevice.cos(angle) * scaling).to(dtype).to(tl.float32)[None, :]
    sin = (libdevice.sin(angle) * scaling).to(dtype).to(tl.float32)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < num_heads) & i_mask[None, :]
    src = x_ptr + n.to(tl.int64) * stride_xn + h * stride_xh + i[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
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
