"""Paged attention over the shared pool: decode (flash-decoding split-K) and prefill/extend.

Contract (``reference.paged_attention``): ``q`` ``[N, heads, D]`` -> ``[N, heads, D]``; the query at
position p of a sequence attends to that sequence's keys at positions ``k <= p`` (and
``k > p - sliding_window``), read through ``block_tables[seq, k // T]`` at offset ``k % T`` from the
strided per-layer pool views ``[num_blocks, T, kv_heads, D]``. T is any positive integer, a
compile-time constant of the kernels (one variant per T: ``pos // T`` and ``pos % T`` per key are
then shifts, or multiplications by a constant, not integer divisions).

Decode (the first ``meta.num_decodes`` sequences, one query each): one program per
(sequence, kv head, split of keys; ``decode_partition`` sizes the splits: ``PARTITION`` keys above
``SPLIT_ABOVE``, smaller ones when the batch is too small to fill the chip or, for mid-size grids,
``SHORT_PARTITION``; ``decode_stages`` the pipeline depth). All query heads of a GQA group share
the program, so each key/value row is read from memory once per kv head; the group is padded to
16 rows for ``tl.dot``. Splits keep the chip busy at small batch; their partial results
(unnormalised accumulator, running max, running sum) are merged by a second small kernel, all
heads of a sequence in one program where they fit (``merge_heads``). The number of splits comes
from the block-table width (``max_blocks * T``), never from sequence lengths on the host, so a
captured CUDA graph replays for any lengths up to its width; a split past its sequence's end
stores only its running max (-inf), and the merge skips its accumulator.

Prefill/extend (the other sequences): ``prefill_attention.py``.

Graph mode (``meta.decode_count`` / ``meta.prefill_tiles``, set by ``runner/prefill_graphs.py``):
the decode grid covers ``num_decodes`` rows of which the device-side count are decodes (the
others write nothing), and the prefill kernel runs over a tile map, so a step of prompt chunks
and decodes can be captured.

Float32 inputs use IEEE float32 dots (no TF32), so the float32 GPU path matches the CPU reference
closely enough for token-exact greedy decoding; bf16/fp16 use the tensor cores with float32
accumulation, and P is cast to the value dtype before the PV product as in flash attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modelhive.kernels.triton import pdl
from modelhive.kernels.triton.attention_tiles import online_softmax, softcap_tanh
from modelhive.kernels.triton.prefill_attention import prefill_attention
from modelhive.runner.attn_metadata import AttentionMetadata

#: keys handled by one decode program when the context is split; the split count is
#: cdiv(max_blocks * T, PARTITION), and 1 (no merge kernel) up to SPLIT_ABOVE keys ...
PARTITION = 512
SPLIT_ABOVE = 1024
#: ... except at small batch: with fewer than SMALL_GRID (rows x kv heads) programs, short
#: contexts are split too, into partitions of at least MIN_PARTITION keys, aiming at
#: TARGET_PROGRAMS programs (batch 1 of a 4-kv-head model would otherwise run 4 programs on a
#: 132-SM chip: 6 us per layer for 200 keys, measured on H200)
SMALL_GRID = 64
TARGET_PROGRAMS = 256
MIN_PARTITION = 64
#: mid-size grids (SMALL_GRID <= rows x kv heads < DEEP_GRID) pipeline three key tiles deep
#: instead of two, and below SHORT_GRID programs tables wider than SPLIT_ABOVE are split into
#: SHORT_PARTITION-key partitions (more programs for long contexts at 16-127 rows)
DEEP_GRID = 384
SHORT_GRID = 256
SHORT_PARTITION = 256


#: partial results one merge program reads (heads x splits x head dim, float32): a sequence's
#: heads are merged by as few programs as fit this, keeping at least MERGE_PROGRAMS programs
#: (one per head at batch 1; MERGE_ELEMENTS = 0: always one per head)
MERGE_ELEMENTS = 8192
MERGE_PROGRAMS = 128


def merge_heads(rows: int, heads: int, per_head: int) -> int:
    """Heads per split-merge program (a power of two)."""
    block_h = min(triton.next_power_of_2(heads), max(1, MERGE_ELEMENTS // per_head))
    while block_h > 1 and rows * triton.cdiv(heads, block_h) < MERGE_PROGRAMS:
        block_h //= 2
    return block_h


def decode_stages(rows: int, kv_heads: int) -> int:
    return 3 if SMALL_GRID <= rows * kv_heads < DEEP_GRID else 2


def decode_partition(rows: int, kv_heads: int, max_len_bound: int) -> int:
    """Keys per decode program for a table ``max_len_bound`` keys wide (static per graph)."""
    partition = PARTITION if max_len_bound > SPLIT_ABOVE else max_len_bound
    if max_len_bound > SPLIT_ABOVE and SMALL_GRID <= rows * kv_heads < SHORT_GRID:
        partition = SHORT_PARTITION
    if rows * kv_heads < SMALL_GRID:
        want = triton.cdiv(TARGET_PROGRAMS, rows * kv_heads)
        even = triton.cdiv(triton.cdiv(max_len_bound, want), MIN_PARTITION) * MIN_PARTITION
        partition = min(partition, max(MIN_PARTITION, even))
    return partition


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, count_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr,
    scale, softcap, window, T: tl.constexpr, num_splits, partition_size,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_cb: tl.constexpr, stride_ct: tl.constexpr, stride_ch: tl.constexpr, stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, DIRECT: tl.constexpr,
    COUNTED: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    PDL_EARLY: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    # Lengths and block tables are staged before the step starts, so they (and the first key
    # tile's block ids) load before waiting for the kernels that wrote q and this step's keys
    # (pdl.py): those loads leave the critical path.
    seq_len = tl.load(seq_lens_ptr + seq)
    group = GROUP  # query heads this program writes: none for a graph's rows past the count
    if COUNTED:  # a graph's decode grid: only the first count rows are decodes
        live = seq < tl.load(count_ptr)
        seq_len = tl.where(live, seq_len, 0)
        group = tl.where(live, GROUP, 0)
    start = split * partition_size
    end = tl.minimum(start + partition_size, seq_len)
    if USE_WINDOW:
        start = tl.maximum(start, seq_len - window)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    pos = start + tl.arange(0, BLOCK_N)
    block = tl.load(table + pos // T, mask=pos < end, other=0).to(tl.int64)
    pdl.wait(USE_PDL, PDL_EARLY)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < group
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    # a split past the sequence's end (or before its window) has no keys: it reads no query
    # and stores only its running max (-inf), which tells the merge to skip its accumulator
    live_mask = (g < tl.where(end > start, group, 0))[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + seq * stride_qn + heads[:, None] * stride_qh + d[None, :],
                mask=live_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    kv_col = kv_head * stride_ch + d[None, :]
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < end
        row = block * stride_cb + (pos % T).to(tl.int64) * stride_ct
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + kv_col, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + kv_col, mask=kv_mask, other=0.0)
        nxt = pos + BLOCK_N  # the next tile's block ids, loaded while this tile computes
        block = tl.load(table + nxt // T, mask=nxt < end, other=0).to(tl.int64)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if USE_SOFTCAP:
            s = softcap * softcap_tanh(s / softcap)
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax(s, v, m_i, l_i, acc, PRECISION)

    out_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:
        denom = tl.where(l_i > 0, l_i, 1.0)
        o = acc / denom[:, None]
        tl.store(out_ptr + seq * stride_on + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partial results: part_acc [S, H, splits, BLOCK_D], part_ml [S, H, splits, 2]
        row_id = (seq * num_kv_heads * GROUP + heads).to(tl.int64) * num_splits + split
        tl.store(part_acc_ptr + row_id[:, None] * BLOCK_D + d[None, :], acc, mask=live_mask)
        tl.store(part_ml_ptr + row_id * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row_id * 2 + 1, l_i, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, count_ptr, num_heads, num_splits, stride_on, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
    COUNTED: tl.constexpr, USE_PDL: tl.constexpr, PDL_EARLY: tl.constexpr,
):
    """Merge the splits' partial results of BLOCK_H heads of one sequence."""
    pdl.wait(USE_PDL, PDL_EARLY)
    seq = tl.program_id(0)
    if COUNTED:  # a graph's decode grid: only the first count rows are decodes
        num_heads_live = tl.where(seq < tl.load(count_ptr), num_heads, 0)
    else:
        num_heads_live = num_heads
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    h_mask = h < num_heads_live
    hs_mask = h_mask[:, None] & (s < num_splits)[None, :]
    row = (seq * num_heads + h).to(tl.int64)[:, None] * num_splits + s[None, :]  # [H, S]
    m = tl.load(part_ml_ptr + row * 2, mask=hs_mask, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + row * 2 + 1, mask=hs_mask, other=0.0)
    # splits without keys (running max -inf) stored no accumulator
    acc = tl.load(part_acc_ptr + row[:, :, None] * BLOCK_D + d[None, None, :],
                  mask=(hs_mask & (m > float("-inf")))[:, :, None], other=0.0)
    m_max = tl.max(m, 1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_max[:, None])
    total = tl.sum(l_s * w, 1)
    o = tl.sum(acc * w[:, :, None], 1) / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + seq * stride_on + h[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & (d < HEAD_DIM)[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    decode_config: dict | None = None,
    prefill_config: dict | None = None,
) -> torch.Tensor:
    """``decode_config`` overrides ``decode_partition`` and the decode kernel's tiles
    (``partition``, ``block_n``, ``num_warps``, ``num_stages``), ``prefill_config`` the
    prefill kernel's (``block_m``, eager metadata only; ``block_n``, ``num_warps``,
    ``num_stages``): benchmarks."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    T = meta.tokens_per_block
    block_d = max(16, triton.next_power_of_2(head_dim))
    use_window = sliding_window is not None
    window = int(sliding_window) if use_window else 0
    use_softcap = softcap is not None
    cap = float(softcap) if use_softcap else 1.0
    precision = _precision(q.dtype)
    tables = meta.block_tables
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0))
    count = meta.decode_count  # graphs of mixed steps: the decodes among num_decodes rows
    counted = count is not None
    count = count if counted else meta.seq_lens  # unused then

    num_decodes = meta.num_decodes
    if num_decodes:
        max_len_bound = tables.shape[1] * T
        cfg = decode_config or {}
        partition = cfg.get("partition") or decode_partition(num_decodes, num_kv_heads,
                                                            max_len_bound)
        num_splits = triton.cdiv(max_len_bound, partition)
        direct = num_splits == 1
        partition = max_len_bound if direct else partition  # one split covers every key
        if direct:
            part_acc = part_ml = out  # unused
        else:
            part_acc = torch.empty((num_decodes, num_heads, num_splits, block_d),
                                   dtype=torch.float32, device=q.device)
            part_ml = torch.empty((num_decodes, num_heads, num_splits, 2),
                                  dtype=torch.float32, device=q.device)
        block_n = cfg.get("block_n", 64 if head_dim <= 128 else 32)
        use_pdl = pdl.enabled(q)
        _decode_kernel[(num_decodes, num_kv_heads, num_splits)](
            q, k_cache, v_cache, tables, meta.seq_lens, count, out, part_acc, part_ml,
            float(scale), cap, window, T, num_splits, partition,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), *cache_strides,
            GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_N=block_n,
            USE_WINDOW=use_window, USE_SOFTCAP=use_softcap, DIRECT=direct, COUNTED=counted,
            PRECISION=precision, USE_PDL=use_pdl, PDL_EARLY=pdl.EARLY, launch_pdl=use_pdl,
            num_warps=cfg.get("num_warps", 4),
            num_stages=cfg.get("num_stages") or decode_stages(num_decodes, num_kv_heads),
        )
        if not direct:
            block_s = max(2, triton.next_power_of_2(num_splits))
            block_h = merge_heads(num_decodes, num_heads, block_s * block_d)
            _decode_reduce_kernel[(num_decodes, triton.cdiv(num_heads, block_h))](
                part_acc, part_ml, out, count, num_heads, num_splits, out.stride(0),
                out.stride(1), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=block_s,
                BLOCK_H=block_h, COUNTED=counted, USE_PDL=use_pdl, PDL_EARLY=pdl.EARLY,
                launch_pdl=use_pdl, num_warps=4,
            )

    prefill_attention(q, k_cache, v_cache, meta, out, scale, sliding_window, softcap, precision,
                      prefill_config)
    return out
