"""Each Triton attention and elementwise kernel against its plain-PyTorch reference on fresh
random inputs (the linears and the argmax: ``test_triton_linears.py``).

Shapes cover head_dim 64/128/256 (and odd small ones the tiny presets use), GQA ratios 1/4/8,
tokens-per-block that are not powers of two, shuffled (non-contiguous) block tables, sliding
windows, soft-capping, decode contexts long enough to use several split-K partitions, and
decodes + prefill/extend chunks in one batch. Outputs are poisoned (NaN) before every kernel
runs, so an element the kernel fails to write shows up.

Runs on CUDA; skipped without it. ``TRITON_INTERPRET=1`` runs the same checks on the CPU through
Triton's interpreter (slow; for kernel development without a GPU).
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch

from modelhive.engine.kv_pool import BLOCK_ALIGN_BYTES, KVLayout, KVPool
from modelhive.kernels import reference
from modelhive.runner.attn_metadata import SeqChunk, build_attention_metadata
from tests.gpu.kernel_checks import (
    DEVICE,
    DTYPES,
    INTERPRET,
    TOL,
    needs_gpu_numerics,
    poison_allocator,
    rel_err,
)

# after kernel_checks, which skips this module without CUDA or Triton
tk = pytest.importorskip("modelhive.kernels.triton")


def make_pool(num_layers: int, kv_heads: int, head_dim: int, dtype: str, tokens: int,
              num_blocks: int) -> tuple[KVPool, KVLayout]:
    """A pool of random values whose (aligned) block holds exactly ``tokens`` tokens."""
    elem = 4 if dtype == "float32" else 2
    per_token = 2 * num_layers * kv_heads * head_dim * elem
    block_bytes = -(-tokens * per_token // BLOCK_ALIGN_BYTES) * BLOCK_ALIGN_BYTES
    layout = KVLayout(num_layers, kv_heads, head_dim, dtype, block_bytes // per_token)
    assert layout.tokens_per_block == tokens
    pool = KVPool(num_blocks, block_bytes, DEVICE)
    pool.storage.view(DTYPES[dtype]).normal_()
    return pool, layout


def views_of(storage: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The view ``like`` takes of the pool, taken of another storage of the same size."""
    return storage.view(like.dtype).as_strided(like.shape, like.stride(), like.storage_offset())


def make_meta(seqs: list[tuple[int, int]], T: int, num_blocks: int, seed: int):
    """``seqs``: (num_cached, num_new) per sequence, decodes (1 new, >0 cached) first."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    chunks = []
    for cached, new in seqs:
        need = -(-(cached + new) // T)
        table = tuple(free.pop() for _ in range(need))
        chunks.append(SeqChunk(cached, new, table))
    return build_attention_metadata(chunks, T, DEVICE)


ATTN_CASES = [
    # dtype, heads, kv_heads, head_dim, T, window, softcap, [(cached, new)]
    ("float32", 4, 4, 64, 13, None, None, [(5, 1), (40, 1), (0, 17), (9, 6)]),
    ("bfloat16", 32, 4, 64, 19, None, None, [(300, 1), (700, 1), (1, 1), (0, 70), (33, 20)]),
    ("bfloat16", 16, 2, 128, 11, None, None, [(129, 1), (600, 1), (0, 130), (250, 1 + 64)]),
    ("float32", 8, 1, 256, 7, None, None, [(50, 1), (0, 23)]),
    ("bfloat16", 8, 1, 256, 23, 40, None, [(100, 1), (520, 1), (0, 90), (60, 30)]),
    ("float32", 4, 1, 32, 5, 16, 3.0, [(20, 1), (3, 1), (0, 40), (31, 9)]),
    ("bfloat16", 32, 8, 128, 29, None, 30.0, [(1000, 1), (0, 5)]),
    ("float32", 4, 2, 24, 6, None, None, [(17, 1), (0, 11)]),
    ("bfloat16", 16, 2, 128, 17, None, None, [(1500, 1), (40, 1), (2100, 1), (0, 33)]),
    ("float32", 8, 1, 64, 31, 300, None, [(1800, 1), (5, 1), (0, 12)]),
    ("float32", 4, 2, 32, 17, None, None, [(900, 1), (40, 1), (0, 9)]),  # one split, > PARTITION
    # small grids: short partitions of a few hundred keys (paged_attention.decode_partition)
    ("bfloat16", 16, 2, 128, 16, 100, None, [(250, 1), (3, 1)]),
    ("bfloat16", 32, 4, 64, 16, None, None, [(400, 1), (0, 7)]),
    # many decode rows over long tables (split and merged), and over short ones (direct)
    ("bfloat16", 14, 2, 64, 16, None, None,
     [(37 * i % 1300 + 1, 1) for i in range(40)] + [(1290, 1), (0, 21)]),
    ("bfloat16", 32, 4, 128, 16, None, None, [(13 * i % 250, 1) for i in range(20)] + [(5, 9)]),
    # long prompts and extends: key tiles before a query tile's first query run unmasked
    ("float32", 4, 2, 32, 7, None, None, [(5, 1), (100, 150), (0, 200)]),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}-T{c[4]}-w{c[5]}-cap{c[6]}")
def test_paged_attention_matches_reference(case):
    dtype_name, heads, kv_heads, head_dim, T, window, softcap, seqs = case
    if INTERPRET and max(c + n for c, n in seqs) > 300:
        pytest.skip("long contexts are too slow in the interpreter")
    dtype = DTYPES[dtype_name]
    torch.manual_seed(hash(case[:5]) % 2**31)
    total = sum(-(-(c + n) // T) for c, n in seqs)
    pool, layout = make_pool(3, kv_heads, head_dim, dtype_name, T, total + 5)
    assert layout.tokens_per_block == T
    k_cache, v_cache = pool.layer_views(layout)[1]
    meta = make_meta(seqs, T, pool.num_blocks, seed=len(seqs))
    q = torch.randn(meta.num_tokens, heads, head_dim, dtype=dtype, device=DEVICE)
    scale = head_dim ** -0.5
    ref = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale,
                                    window, softcap)
    poison_allocator()
    out = tk.paged_attention(q, k_cache, v_cache, meta, scale, window, softcap)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("partition", [16, 32, 48, 128])
@pytest.mark.parametrize("merge_programs", [128, 1])
def test_paged_attention_decode_splits(partition, merge_programs, monkeypatch):
    """Decodes over a 208-key table split into 2-13 partitions and merged (one merge program
    per head, or all of a sequence's heads in one); a row of 1 key."""
    # the module, not the function the package exports under the same name
    monkeypatch.setattr(importlib.import_module("modelhive.kernels.triton.paged_attention"),
                        "MERGE_PROGRAMS", merge_programs)
    T, heads, kv_heads, dim = 13, 6, 2, 32
    seqs = [(150, 1), (0, 1), (37, 1), (207, 1), (64, 1)]
    pool, layout = make_pool(2, kv_heads, dim, "float32", T, 5 * 16 + 2)
    k_cache, v_cache = pool.layer_views(layout)[1]
    meta = make_meta(seqs, T, pool.num_blocks, seed=3)
    q = torch.randn(len(seqs), heads, dim, dtype=torch.float32, device=DEVICE)
    ref = reference.paged_attention(q, k_cache, v_cache, meta, dim ** -0.5)
    out = tk.paged_attention(q, k_cache, v_cache, meta, dim ** -0.5,
                             decode_config={"partition": partition})
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("block_m,block_n,window", [(16, 16, None), (32, 16, None), (16, 32, 50),
                                                   (64, 32, None)])
def test_paged_attention_prefill_tiles(block_m, block_n, window):
    """Prefill/extend with small query and key tiles (many unmasked key tiles per program)."""
    T, heads, kv_heads, dim = 9, 6, 2, 32
    seqs = [(40, 1), (0, 130), (77, 61), (3, 2)]
    total = sum(-(-(c + n) // T) for c, n in seqs)
    pool, layout = make_pool(2, kv_heads, dim, "float32", T, total + 3)
    k_cache, v_cache = pool.layer_views(layout)[0]
    meta = make_meta(seqs, T, pool.num_blocks, seed=8)
    q = torch.randn(meta.num_tokens, heads, dim, dtype=torch.float32, device=DEVICE)
    ref = reference.paged_attention(q, k_cache, v_cache, meta, dim ** -0.5, window)
    poison_allocator()
    out = tk.paged_attention(q, k_cache, v_cache, meta, dim ** -0.5, window,
                             prefill_config={"block_m": block_m, "block_n": block_n})
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype_name,heads,kv_heads,head_dim,T,window,seqs", [
    ("float32", 4, 2, 32, 7, None, [(40, 1), (3, 1), (0, 70), (21, 9), (0, 1)]),
    ("float32", 8, 1, 64, 16, 30, [(90, 1), (0, 150)]),
    ("float32", 4, 4, 16, 5, None, [(0, 33), (12, 40)]),  # no decodes
    ("bfloat16", 14, 2, 64, 16, None, [(300, 1), (17, 1), (5, 1), (0, 200), (64, 64)]),
])
def test_paged_attention_graph_mode(dtype_name, heads, kv_heads, head_dim, T, window, seqs):
    """A graph's static metadata (rows, sequences and table width padded; the decode count on
    the device; prefill programs from a tile map) gives the same rows as exact metadata."""
    from modelhive.runner.attn_metadata import AttentionMetadata, prefill_block_m, prefill_tiles

    if INTERPRET and max(c + n for c, n in seqs) > 300:
        pytest.skip("long contexts are too slow in the interpreter")
    needs_gpu_numerics(DTYPES[dtype_name])
    dtype = DTYPES[dtype_name]
    total = sum(-(-(c + n) // T) for c, n in seqs)
    pool, layout = make_pool(2, kv_heads, head_dim, dtype_name, T, total + 5)
    k_cache, v_cache = pool.layer_views(layout)[0]
    meta = make_meta(seqs, T, pool.num_blocks, seed=11)
    n, num_seqs = meta.num_tokens, meta.num_seqs
    rows, max_seqs, width, slots = n + 13, num_seqs + 3, meta.block_tables.shape[1] + 4, 40
    q = torch.randn(rows, heads, head_dim, dtype=dtype, device=DEVICE)
    ref = reference.paged_attention(q[:n].float(), k_cache.float(), v_cache.float(), meta,
                                    head_dim ** -0.5, window)

    def padded(t: torch.Tensor, size: int, fill: int) -> torch.Tensor:
        out = torch.full((size, *t.shape[1:]), fill, dtype=t.dtype, device=DEVICE)
        out[:t.shape[0]] = t
        return out

    tables = torch.zeros(max_seqs, width, dtype=torch.int32, device=DEVICE)
    tables[:num_seqs, :meta.block_tables.shape[1]] = meta.block_tables
    block_m = prefill_block_m(head_dim)
    qsl = meta.query_start_loc.cpu().numpy()
    graph = AttentionMetadata(
        tokens_per_block=T, num_decodes=max_seqs, positions=padded(meta.positions, rows, 0),
        slot_blocks=padded(meta.slot_blocks, rows, -1),
        slot_offsets=padded(meta.slot_offsets, rows, 0),
        query_start_loc=padded(meta.query_start_loc, max_seqs + 1, n),
        seq_lens=padded(meta.seq_lens, max_seqs, 0), block_tables=tables,
        query_start_loc_host=(0,) * (max_seqs + 1), seq_lens_host=(0,) * max_seqs,
        decode_count=torch.tensor([meta.num_decodes], dtype=torch.int32, device=DEVICE),
        prefill_tiles=torch.from_numpy(
            prefill_tiles(qsl, meta.num_decodes, block_m, slots)).to(DEVICE),
        prefill_block_m=block_m)
    poison_allocator()
    out = tk.paged_attention(q, k_cache, v_cache, graph, head_dim ** -0.5, window)
    assert rel_err(out[:n], ref) < TOL[dtype]


def test_paged_attention_decode_zero_length_rows_are_finite():
    """Padded rows of a decode graph (seq_len 0) produce zeros, not NaN."""
    pool, layout = make_pool(1, 2, 64, "bfloat16", 9, 8)
    k_cache, v_cache = pool.layer_views(layout)[0]
    meta = make_meta([(10, 1), (4, 1)], 9, 8, seed=0)
    meta.seq_lens[1] = 0
    q = torch.randn(2, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    out = tk.paged_attention(q, k_cache, v_cache, meta, 0.125)
    assert torch.isfinite(out).all() and out[1].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype_name,kv_heads,head_dim,T", [
    ("float32", 2, 64, 13), ("bfloat16", 4, 128, 7), ("bfloat16", 1, 256, 21), ("float32", 3, 24, 5)])
def test_store_kv_writes_exactly_the_slots(dtype_name, kv_heads, head_dim, T):
    dtype = DTYPES[dtype_name]
    pool, layout = make_pool(4, kv_heads, head_dim, dtype_name, T, 12)
    views = pool.layer_views(layout)
    meta = make_meta([(7, 1), (2 * T - 1, 1), (0, 3 * T + 2), (T, 5)], T, pool.num_blocks, seed=3)
    n = meta.num_tokens
    qkv = torch.randn(n, (2 + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    # k, v as strided views of a fused projection, like the models pass them
    k = qkv[:, 2 * head_dim:(2 + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    v = qkv[:, (2 + kv_heads) * head_dim:].view(n, kv_heads, head_dim)
    pool.storage.view(dtype).fill_(float("nan"))
    expected = pool.storage.clone()
    k_cache, v_cache = views[2]
    reference.store_kv(views_of(expected, k_cache), views_of(expected, v_cache), k, v, meta)
    tk.store_kv(k_cache, v_cache, k, v, meta)
    assert torch.equal(pool.storage, expected)  # same bytes, NaN elsewhere untouched


def test_store_kv_skips_negative_blocks():
    pool, layout = make_pool(1, 2, 64, "bfloat16", 9, 4)
    k_cache, v_cache = pool.layer_views(layout)[0]
    meta = make_meta([(3, 1), (5, 1)], 9, 4, seed=1)
    expected = pool.storage.clone()
    meta.slot_blocks[1] = -1
    k = torch.randn(2, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    tk.store_kv(k_cache, v_cache, k, k, meta)
    b, o = int(meta.slot_blocks[0]), int(meta.slot_offsets[0])
    views_of(expected, k_cache)[b, o] = k[0]
    views_of(expected, v_cache)[b, o] = k[0]
    assert torch.equal(pool.storage, expected)  # token 0 written, the skipped token nowhere


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,offset", [((37, 2048), 0.0), ((5, 640), 1.0), ((300, 896), 0.0),
                                          ((9, 4096), 0.0)])
def test_rms_norm(dtype_name, shape, offset):
    dtype = DTYPES[dtype_name]
    needs_gpu_numerics(dtype)
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    w = torch.randn(shape[-1], dtype=dtype, device=DEVICE)
    ref = reference.rms_norm(x, w, 1e-6, offset)
    poison_allocator()
    out = tk.rms_norm(x, w, 1e-6, offset)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads,head_dim", [(16, 128), (4, 256), (9, 64), (4, 24)])
def test_rms_norm_on_strided_heads(dtype_name, heads, head_dim):
    """qk-norm: ``[N, heads, D]`` views of a fused qkv output."""
    dtype = DTYPES[dtype_name]
    n = 19
    qkv = torch.randn(n, 3 * heads * head_dim, dtype=dtype, device=DEVICE)
    q = qkv[:, heads * head_dim:2 * heads * head_dim].view(n, heads, head_dim)
    w = torch.randn(head_dim, dtype=dtype, device=DEVICE)
    ref = reference.rms_norm(q, w, 1e-6, 1.0)
    poison_allocator()
    out = tk.rms_norm(q, w, 1e-6, 1.0)
    assert out.shape == q.shape
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads,head_dim,scaling", [(32, 64, 1.0), (2, 128, 1.0), (4, 256, 1.0),
                                                    (3, 24, 0.75)])
def test_rope(dtype_name, heads, head_dim, scaling):
    dtype = DTYPES[dtype_name]
    needs_gpu_numerics(dtype, libdevice=True)
    n = 45
    big = torch.randn(n, 2 * heads * head_dim, dtype=dtype, device=DEVICE)
    x = big[:, heads * head_dim:].view(n, heads, head_dim)  # strided, like q/k views
    positions = torch.randint(0, 4096, (n,), device=DEVICE)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    ref = reference.apply_rope(x, positions, inv_freq, scaling)
    poison_allocator()
    out = tk.apply_rope(x, positions, inv_freq, scaling)
    assert out.shape == x.shape
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows,inter", [(1, 5632), (33, 11008), (7, 160), (130, 2048)])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_activations(dtype_name, rows, inter, act):
    dtype = DTYPES[dtype_name]
    needs_gpu_numerics(dtype, libdevice=act == "gelu_tanh")
    x = torch.randn(rows, 2 * inter, dtype=dtype, device=DEVICE) * 2
    ref_fn, fn = ((reference.silu_and_mul, tk.silu_and_mul) if act == "silu"
                  else (reference.gelu_tanh_and_mul, tk.gelu_tanh_and_mul))
    ref = ref_fn(x)
    poison_allocator()
    out = fn(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,T", [(32, 4, 64, 19), (16, 2, 128, 16),
                                                       (8, 1, 256, 7), (3, 3, 24, 5)])
def test_rope_store_kv(dtype_name, heads, kv_heads, head_dim, T):
    """q rotated in place inside the fused qkv output; rotated k and v land in the pool."""
    dtype = DTYPES[dtype_name]
    needs_gpu_numerics(dtype, libdevice=True)
    pool, layout = make_pool(2, kv_heads, head_dim, dtype_name, T, num_blocks=40)
    k_cache, v_cache = pool.layer_views(layout)[1]
    meta = make_meta([(30, 1), (7, 1), (0, 25), (12, 9)], T, 40, seed=heads)
    n = int(meta.positions.numel())
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(n, q_size + 2 * kv_size, dtype=dtype, device=DEVICE)
    q, k, v = (t.view(n, -1, head_dim) for t in qkv.split([q_size, kv_size, kv_size], dim=-1))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    expected = pool.storage.clone()
    ref_q = reference.rope_store_kv(q, k, v, meta.positions, inv_freq, views_of(expected, k_cache),
                                    views_of(expected, v_cache), meta)
    q_out = tk.rope_store_kv(q, k, v, meta.positions, inv_freq, k_cache, v_cache, meta)
    assert q_out.data_ptr() == q.data_ptr()  # in place
    assert rel_err(q_out, ref_q) < (1e-5 if dtype == torch.float32 else 8e-3)
    got, want = views_of(pool.storage, k_cache), views_of(expected, k_cache)
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 8e-3)
    assert torch.equal(views_of(pool.storage, v_cache), views_of(expected, v_cache))


def test_rope_store_kv_skips_negative_blocks():
    needs_gpu_numerics(libdevice=True)
    pool, layout = make_pool(1, 2, 64, "float32", 8, num_blocks=4)
    k_cache, v_cache = pool.layer_views(layout)[0]
    meta = make_meta([(3, 1)], 8, 4, seed=0)
    skip = type(meta)(**{**meta.__dict__, "slot_blocks": torch.full_like(meta.slot_blocks, -1)})
    before = pool.storage.clone()
    q, k, v = (torch.randn(1, h, 64, device=DEVICE) for h in (4, 2, 2))
    tk.rope_store_kv(q, k, v, meta.positions, torch.ones(32, device=DEVICE), k_cache, v_cache,
                     skip)
    assert torch.equal(pool.storage, before)
