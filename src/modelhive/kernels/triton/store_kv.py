"""Store-KV: write a step's new keys and values into the shared pool through its strided views.

Contract (``reference.store_kv``): ``k``/``v`` ``[N, kv_heads, D]`` go to
``cache[meta.slot_blocks[i], meta.slot_offsets[i]]``. A negative block id skips the token: the
padded rows of a captured decode graph use it, so padding never touches the pool.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modelhive.runner.attn_metadata import AttentionMetadata


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_blocks_ptr, slot_offsets_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_cb, stride_ct, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    block = tl.load(slot_blocks_ptr + tok).to(tl.int64)
    offset = tl.load(slot_offsets_ptr + tok).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM) & (block >= 0)
    dst = block * stride_cb + offset * stride_ct + h * stride_ch + d
    k = tl.load(k_ptr + tok * stride_kn + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + tok * stride_vn + h * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, meta.slot_blocks, meta.slot_offsets,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=1 if kv_heads * head_dim <= 512 else 4,
    )
