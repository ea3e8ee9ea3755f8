"""Prefill/extend attention over the shared pool (``paged_attention`` runs it for the sequences
after the decodes): one program per (sequence, tile of ``BLOCK_M`` queries, query head), an
online-softmax loop over key tiles of the cached + new keys (``_prefill_tile``): the tiles wholly
before the program's first query unmasked, then the causal (and window) masks.

Eagerly the grid comes from ``meta.query_start_loc_host``; in graph mode (``meta.prefill_tiles``,
``runner/prefill_graphs.py``) it is one program per tile-map entry (sequence, query tile), and
(-1, -1) entries write nothing, so a step of prompt chunks can be captured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modelhive.kernels.triton.attention_tiles import online_softmax, softcap_tanh
from modelhive.runner.attn_metadata import AttentionMetadata, prefill_block_m


@triton.jit
def _prefill_tile(q, m_i, l_i, acc, n0, hi, q_pos, k_cache_ptr, v_cache_ptr, table, kv_col,
                  d_mask, scale, softcap, window, T: tl.constexpr, stride_cb: tl.constexpr,
                  stride_ct: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_WINDOW: tl.constexpr,
                  USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the prefill loop: the online-softmax update of (m_i, l_i, acc).
    Unmasked (``MASKED`` False) only for tiles every query of the program sees whole."""
    pos = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        p_mask = pos < hi
        block = tl.load(table + pos // T, mask=p_mask, other=0).to(tl.int64)
        kv_mask = p_mask[:, None] & d_mask[None, :]
    else:
        block = tl.load(table + pos // T).to(tl.int64)
        kv_mask = d_mask[None, :]
    row = block * stride_cb + (pos % T).to(tl.int64) * stride_ct
    k = tl.load(k_cache_ptr + row[:, None] + kv_col, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + row[:, None] + kv_col, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if USE_SOFTCAP:
        s = softcap * softcap_tanh(s / softcap)
    if MASKED:
        keep = p_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            keep = keep & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
    return online_softmax(s, v, m_i, l_i, acc, PRECISION)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, tiles_ptr,
    out_ptr, scale, softcap, window, T: tl.constexpr, first_seq,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_cb: tl.constexpr, stride_ct: tl.constexpr, stride_ch: tl.constexpr, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, TILE_MAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    if TILE_MAP:  # a graph's grid: program i takes entry i of the tile map, (-1, -1) = none
        seq = tl.load(tiles_ptr + 2 * tl.program_id(0))
        tile = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
        live = seq >= 0
        seq = tl.maximum(seq, 0)
        tile = tl.maximum(tile, 0)
    else:
        seq = first_seq + tl.program_id(0)
        tile = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if TILE_MAP:
        q_len = tl.where(live, q_len, 0)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_cached = seq_len - q_len

    m_offs = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m_offs < q_len
    q_pos = num_cached + m_offs
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q_rows = (q_start + m_offs).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qn + head * stride_qh + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    # keys this tile needs: up to its last query (causal), from its first query's window start
    hi = tl.minimum(seq_len, num_cached + (tile + 1) * BLOCK_M)
    if TILE_MAP:
        hi = tl.where(live, hi, 0)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(0, num_cached + tile * BLOCK_M - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_col = kv_head * stride_ch + d[None, :]
    # key tiles wholly before the tile's first query need no mask (every query sees them);
    # only the tiles on the diagonal (and, with a window, every tile) are masked
    full_hi = lo
    if not USE_WINDOW:
        full_hi = tl.minimum(((num_cached + tile * BLOCK_M) // BLOCK_N) * BLOCK_N, hi)
    for n0 in range(lo, full_hi, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(
            q, m_i, l_i, acc, n0, hi, q_pos, k_cache_ptr, v_cache_ptr, table, kv_col, d_mask,
            scale, softcap, window, T, stride_cb, stride_ct, BLOCK_N, False, USE_WINDOW,
            USE_SOFTCAP, PRECISION)
    for n0 in range(full_hi, hi, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(
            q, m_i, l_i, acc, n0, hi, q_pos, k_cache_ptr, v_cache_ptr, table, kv_col, d_mask,
            scale, softcap, window, T, stride_cb, stride_ct, BLOCK_N, True, USE_WINDOW,
            USE_SOFTCAP, PRECISION)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_on + head * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, out: torch.Tensor, scale: float,
                      sliding_window: int | None, softcap: float | None, precision: str,
                      prefill_config: dict | None = None) -> None:
    """Write the prefill/extend sequences' rows of ``out`` (``paged_attention``'s contract);
    ``prefill_config`` overrides the tiles (``block_m``, eager metadata only; ``block_n``,
    ``num_warps``, ``num_stages``)."""
    tiles = meta.prefill_tiles
    tile_map = tiles is not None
    num_decodes = meta.num_decodes
    num_prefills = meta.num_seqs - num_decodes
    if not (tile_map or num_prefills):
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    tables = meta.block_tables
    pcfg = prefill_config or {}
    block_m = pcfg.get("block_m") or prefill_block_m(head_dim)
    block_n = pcfg.get("block_n") or (64 if head_dim <= 64 else 32)
    if tile_map:  # a graph's grid: one program per tile-map entry and head
        assert tiles.shape[1] == 2 and meta.prefill_block_m == block_m
        grid = (tiles.shape[0], 1, num_heads)
    else:
        qsl = meta.query_start_loc_host
        max_q = max(qsl[s + 1] - qsl[s] for s in range(num_decodes, meta.num_seqs))
        grid = (num_prefills, triton.cdiv(max_q, block_m), num_heads)
        tiles = meta.seq_lens  # unused
    _prefill_kernel[grid](
        q, k_cache, v_cache, tables, meta.seq_lens, meta.query_start_loc, tiles, out,
        float(scale), 1.0 if softcap is None else float(softcap),
        0 if sliding_window is None else int(sliding_window), meta.tokens_per_block,
        num_decodes, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None, USE_SOFTCAP=softcap is not None,
        TILE_MAP=tile_map, PRECISION=precision, num_warps=pcfg.get("num_warps", 4),
        num_stages=pcfg.get("num_stages", 2),
    )
