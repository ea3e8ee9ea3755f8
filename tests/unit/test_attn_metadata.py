"""``build_attention_metadata`` (numpy per token, ``metadata_arrays``) against a per-token
construction written out, over random steps of decodes and prompt chunks; a table too short
for its chunk is refused; the prefill graphs' tile map."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from modelhive.runner.attn_metadata import (
    SeqChunk,
    build_attention_metadata,
    prefill_block_m,
    prefill_tiles,
)


def _written_out(chunks: list[SeqChunk], T: int) -> dict:
    positions, blocks, offsets, qsl, lens = [], [], [], [0], []
    for c in chunks:
        for p in range(c.num_cached, c.num_cached + c.num_new):
            positions.append(p)
            blocks.append(c.block_table[p // T])
            offsets.append(p % T)
        qsl.append(qsl[-1] + c.num_new)
        lens.append(c.num_cached + c.num_new)
    width = max(len(c.block_table) for c in chunks)
    tables = [list(c.block_table) + [0] * (width - len(c.block_table)) for c in chunks]
    decodes = 0
    for c in chunks:
        if c.num_new != 1 or c.num_cached == 0:
            break
        decodes += 1
    return dict(positions=positions, slot_blocks=blocks, slot_offsets=offsets,
                query_start_loc=qsl, seq_lens=lens, block_tables=tables, num_decodes=decodes)


@pytest.mark.parametrize("seed", range(6))
def test_metadata_matches_a_per_token_construction(seed):
    rng = random.Random(seed)
    T = rng.choice([1, 3, 16, 19])
    chunks = []
    for i in range(rng.randint(1, 12)):
        decode = i < 4 and rng.random() < 0.7
        cached = rng.randint(1, 90) if decode else rng.choice([0, rng.randint(0, 60)])
        new = 1 if decode else rng.randint(1, 70)
        need = -(-(cached + new) // T)
        table = tuple(rng.randrange(1000) for _ in range(need + rng.randint(0, 2)))
        chunks.append(SeqChunk(cached, new, table))
    meta = build_attention_metadata(chunks, T)
    want = _written_out(chunks, T)
    assert meta.num_decodes == want["num_decodes"]
    for name, dtype in [("positions", torch.long), ("slot_blocks", torch.long),
                        ("slot_offsets", torch.long), ("query_start_loc", torch.int32),
                        ("seq_lens", torch.int32), ("block_tables", torch.int32)]:
        got = getattr(meta, name)
        assert got.dtype == dtype, name
        assert got.tolist() == want[name], name
    assert meta.query_start_loc_host == tuple(want["query_start_loc"])
    assert meta.seq_lens_host == tuple(want["seq_lens"])
    assert all(type(v) is int for v in meta.seq_lens_host + meta.query_start_loc_host)


def test_a_table_too_short_for_its_chunk_is_refused():
    chunks = [SeqChunk(5, 1, (1, 2)), SeqChunk(0, 9, (3, 4))]  # T = 4: 9 tokens need 3 blocks
    with pytest.raises(ValueError, match="block table of 2 blocks cannot hold 9 tokens"):
        build_attention_metadata(chunks, 4)


def test_prefill_tiles_list_every_query_tile_once():
    """Graph mode's tile map: (sequence, tile) for each prefill sequence's query tiles, in
    order, decodes skipped, the rest (-1, -1); too many tiles is an error."""
    # 2 decodes, then prompts of 68, 1 and 129 tokens
    qsl = np.array([0, 1, 2, 70, 71, 200], dtype=np.int32)
    tiles = prefill_tiles(qsl, 2, 64, 8)
    assert tiles.dtype == np.int32 and tiles.shape == (8, 2)
    assert tiles.tolist() == [[2, 0], [2, 1], [3, 0], [4, 0], [4, 1], [4, 2], [-1, -1], [-1, -1]]
    assert (prefill_tiles(np.array([0, 1, 2]), 2, 64, 3) == -1).all()  # decodes only
    with pytest.raises(ValueError, match="do not fit"):
        prefill_tiles(qsl, 2, 64, 5)
    assert prefill_block_m(64) == prefill_block_m(128) == 64 and prefill_block_m(256) == 32
