"""KV pool layout and the block allocator (pure Python parts tested with hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelhive.engine.kv_pool import (
    BlockAllocator,
    KVLayout,
    KVPool,
    ModelQuota,
    choose_block_bytes,
)
from modelhive.errors import ConfigError
from modelhive.models.arch import ArchConfig


def arch(layers, kv_heads, head_dim):
    return ArchConfig(arch="llama", vocab_size=32, hidden_size=64, intermediate_size=128,
                      num_layers=layers, num_heads=kv_heads * 2, num_kv_heads=kv_heads,
                      head_dim=head_dim)


def test_block_size_gives_biggest_model_16_tokens_and_others_more():
    a, b = arch(4, 2, 16), arch(2, 1, 16)  # 512 and 128 bytes/token in float32
    block = choose_block_bytes([a.kv_bytes_per_token("float32"), b.kv_bytes_per_token("float32")])
    la = KVLayout.for_model(a, "float32", block)
    lb = KVLayout.for_model(b, "float32", block)
    assert la.tokens_per_block >= 16
    assert lb.tokens_per_block == block // b.kv_bytes_per_token("float32")
    # waste under one token per block
    for lay in (la, lb):
        assert block - lay.used_bytes_per_block < lay.bytes_per_token


def test_layer_views_are_disjoint_and_cover_each_block():
    a, b = arch(3, 2, 8), arch(2, 1, 8)
    block = 2048  # a: 3*2*2*8*4=384 B/token -> 5 tokens (not a power of two); b: 128 B -> 16
    pool = KVPool(num_blocks=6, block_bytes=block)
    for model in (a, b):
        lay = KVLayout.for_model(model, "float32", block)
        pool.storage.zero_()
        views = pool.layer_views(lay)
        for i, (k, v) in enumerate(views):
            k.fill_(2 * i + 1)
            v.fill_(2 * i + 2)
        typed = pool.storage.view(torch.float32).view(6, block // 4)
        used = lay.used_bytes_per_block // 4
        # every used element written exactly once, in [layer, K/V, T, heads, dim] order
        expected = torch.arange(1, 2 * model.num_layers + 1, dtype=torch.float32)
        expected = expected.repeat_interleave(lay.tokens_per_block * model.kv_size)
        for blk in range(6):
            assert torch.equal(typed[blk, :used], expected)
            assert torch.all(typed[blk, used:] == 0)


def test_views_of_two_models_share_storage():
    a, b = arch(2, 1, 8), arch(1, 1, 8)
    pool = KVPool(4, 1024)
    ka, _ = pool.layer_views(KVLayout.for_model(a, "float32", 1024))[0]
    kb, _ = pool.layer_views(KVLayout.for_model(b, "float32", 1024))[0]
    ka[2, 0, 0, 0] = 7.0
    assert kb[2, 0, 0, 0] == 7.0  # same bytes: block 2 is whoever's it is lent to


def test_allocator_reserves_minimums_and_caps():
    alloc = BlockAllocator(10, {"a": ModelQuota(min_blocks=3), "b": ModelQuota(max_blocks=4)})
    assert alloc.num_available("b") == 4  # cap
    assert alloc.num_available("a") == 10
    got = alloc.allocate("b", 4)
    assert len(got) == 4 and not alloc.can_allocate("b", 1)
    assert alloc.num_available("a") == 6
    alloc.free("b", got[:2])
    assert alloc.num_available("b") == 2
    # b can never eat into a's minimum
    alloc2 = BlockAllocator(5, {"a": ModelQuota(min_blocks=3), "b": ModelQuota()})
    assert alloc2.num_available("b") == 2
    alloc2.allocate("a", 1)
    assert alloc2.num_available("b") == 2
    alloc2.check_integrity()


def test_allocator_rejects_bad_quotas_and_double_free():
    with pytest.raises(ConfigError):
        BlockAllocator(4, {"a": ModelQuota(min_blocks=3), "b": ModelQuota(min_blocks=2)})
    alloc = BlockAllocator(4, {"a": ModelQuota(), "b": ModelQuota()})
    blocks = alloc.allocate("a", 2)
    with pytest.raises(RuntimeError):
        alloc.free("b", blocks)
    alloc.free("a", blocks)
    with pytest.raises(RuntimeError):
        alloc.free("a", blocks)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "abort"]), st.sampled_from("abc"),
                          st.integers(1, 6)), max_size=80),
       st.integers(0, 4), st.integers(0, 4), st.one_of(st.none(), st.integers(4, 12)))
def test_allocator_random_sequences_keep_invariants(ops, min_a, min_b, cap_c):
    quotas = {"a": ModelQuota(min_blocks=min_a), "b": ModelQuota(min_blocks=min_b),
              "c": ModelQuota(max_blocks=cap_c)}
    alloc = BlockAllocator(16, quotas)
    held = {"a": [], "b": [], "c": []}
    for op, model, n in ops:
        if op == "alloc":
            can = alloc.can_allocate(model, n)
            if can:
                blocks = alloc.allocate(model, n)
                assert len(set(blocks)) == n
                held[model].append(blocks)
            else:
                with pytest.raises(RuntimeError):
                    alloc.allocate(model, n)
        elif held[model]:
            blocks = held[model].pop(0 if op == "free" else -1)
            alloc.free(model, blocks)
        alloc.check_integrity()
        # a model under its minimum can always get up to its minimum
        for m, q in quotas.items():
            used = alloc.num_used_blocks(m)
            if used < q.min_blocks:
                assert alloc.num_available(m) >= q.min_blocks - used
    for m, lists in held.items():
        for blocks in lists:
            alloc.free(m, blocks)
    alloc.check_integrity()
    assert alloc.num_free_blocks == 16
