"""The CPU fast paths of ``kernels/reference.py`` against the plain formulations they replace:
RMSNorm as one ``layer_norm`` over ``[x, -x]`` (bf16/fp16), one decode's float32 attention, and
a step's whole prompts attending as one padded causal SDPA."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from modelhive.kernels import reference, reference_attention
from modelhive.runner.attn_metadata import SeqChunk, build_attention_metadata


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_rms_norm_cpu_matches_torch_rms_norm(dtype, rows):
    torch.manual_seed(rows)
    x = (torch.randn(rows, 576) * 3).to(dtype)
    w = (torch.randn(576) * 0.2 + 1).to(dtype)
    ours = reference.rms_norm(x, w, 1e-5)
    assert ours.dtype == dtype and ours.shape == x.shape
    exact = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
             * w.float())
    ulp = torch.finfo(dtype).eps * exact.abs()  # one unit in the last place (within 2x)
    assert ((ours.float() - exact).abs() <= ulp).all()
    same = (ours == F.rms_norm(x, (576,), w, 1e-5)).float().mean()
    assert same > 0.999  # the same single rounding as torch's op, up to rare ties


def test_rms_norm_cpu_sees_weight_updates():
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    first = reference.rms_norm(x, w, 1e-6)
    w.mul_(2)  # the doubled weight is cached per weight and refreshed on in-place changes
    assert torch.equal(reference.rms_norm(x, w, 1e-6), (first.float() * 2).to(torch.bfloat16))


def _pool(dtype, num_blocks=64, tokens=7, kv_heads=3, head_dim=16, layers=3, layer=1):
    """K/V views of one layer in a pool laid out like ``KVPool.layer_views`` (block stride
    spanning all layers, V plane right after K)."""
    plane = tokens * kv_heads * head_dim
    block = layers * 2 * plane + 32
    storage = torch.randn(num_blocks * block, dtype=dtype)
    size, stride = (num_blocks, tokens, kv_heads, head_dim), (block, kv_heads * head_dim, head_dim, 1)
    return (storage.as_strided(size, stride, 2 * layer * plane),
            storage.as_strided(size, stride, (2 * layer + 1) * plane))


def _meta(specs, tokens, num_blocks, seed=0):
    """Metadata for (num_cached, num_new) chunks with shuffled, disjoint block tables."""
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    chunks = []
    for cached, new in specs:
        n = -(-(cached + new) // tokens)
        chunks.append(SeqChunk(cached, new, tuple(free[:n])))
        free = free[n:]
    return build_attention_metadata(chunks, tokens)


def _per_sequence(q, k_cache, v_cache, meta, scale):
    """Each sequence alone with an explicit causal mask over its gathered keys (float32)."""
    out = torch.empty_like(q, dtype=torch.float32)
    T = meta.tokens_per_block
    qsl = meta.query_start_loc_host
    group = q.shape[1] // k_cache.shape[2]
    for s in range(meta.num_seqs):
        start, end, n = qsl[s], qsl[s + 1], meta.seq_lens_host[s]
        pos = torch.arange(n)
        blocks = meta.block_tables[s].long()[pos // T]
        k = k_cache[blocks, pos % T].float().repeat_interleave(group, 1).transpose(0, 1)
        v = v_cache[blocks, pos % T].float().repeat_interleave(group, 1).transpose(0, 1)
        q_pos = torch.arange(n - (end - start), n)
        mask = pos.unsqueeze(0) <= q_pos.unsqueeze(1)
        scores = (q[start:end].float().transpose(0, 1) @ k.transpose(1, 2)) * scale
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
        out[start:end] = (probs @ v).transpose(0, 1)
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("specs", [
    [(20, 1)],  # one decode: the float32 bmm path
    [(0, 13), (0, 5), (0, 1), (0, 9)],  # whole prompts only: one padded SDPA
    [(20, 1), (9, 1), (0, 13), (11, 6), (0, 5), (0, 17)],  # decodes, prompts and a later chunk
])
def test_paged_attention_fast_paths_match_per_sequence_attention(dtype, tol, specs):
    torch.manual_seed(len(specs))
    k_cache, v_cache = _pool(dtype)
    meta = _meta(specs, k_cache.shape[1], k_cache.shape[0])
    q = torch.randn(meta.num_tokens, 6, 16, dtype=dtype)
    ours = reference.paged_attention(q, k_cache, v_cache, meta, 0.25)
    assert ours.shape == q.shape and ours.dtype == dtype
    ref = _per_sequence(q, k_cache, v_cache, meta, 0.25)
    assert (ours.float() - ref).abs().max() < tol


def test_whole_prompt_batch_skips_lopsided_padding():
    """One long prompt with short ones would more than double the padded tokens: they take the
    per-sequence path (and give the same result)."""
    k_cache, v_cache = _pool(torch.float32, num_blocks=128)
    meta = _meta([(0, 300), (0, 3), (0, 2)], k_cache.shape[1], k_cache.shape[0])
    assert reference_attention._prompt_batch(meta) is None
    q = torch.randn(meta.num_tokens, 6, 16)
    ours = reference.paged_attention(q, k_cache, v_cache, meta, 0.25)
    assert (ours - _per_sequence(q, k_cache, v_cache, meta, 0.25)).abs().max() < 1e-5
