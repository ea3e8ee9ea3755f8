"""``DecodeGraphs._stage`` (the one-copy staging of a graph step's inputs) on the CPU: the staged
buffer matches a plain row-by-row fill over steps whose rows reorder or shift, grow their tables,
share a table inside a prompt chunk, and shrink back to padding; a table object already staged in
a row is not written again."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from modelhive.runner.cuda_graphs import DecodeGraphs


class _Event:
    def synchronize(self) -> None:
        pass

    def record(self) -> None:
        pass


def _graphs(B: int, M: int, T: int, steps: int = 1) -> DecodeGraphs:
    g = DecodeGraphs.__new__(DecodeGraphs)  # no CUDA: only the staging state
    g.max_batch, g.max_blocks, g.tokens_per_block, g.steps = B, M, T, steps
    g._host = torch.zeros(g.buffer_size(), dtype=torch.int32)
    g._host_views()
    g._dev = torch.zeros_like(g._host)
    g._copied = _Event()
    return g


def _expected(rows, bs: int, B: int, M: int, T: int, prev_tables: np.ndarray) -> np.ndarray:
    """A plain fill: scalars of every row, padding past the rows, each row's table written."""
    host = np.zeros(5 * B + B * M, dtype=np.int32)
    tables = host[5 * B:].reshape(B, M)
    tables[:] = prev_tables  # rows past the step keep what they held
    for i, (tok, p, table) in enumerate(rows):
        host[i], host[B + i], host[2 * B + i] = tok, p, table[p // T]
        host[3 * B + i], host[4 * B + i] = p % T, p + 1
        tables[i, :len(table)] = table
    n = len(rows)
    host[2 * B + n:2 * B + bs] = -1
    return host


@pytest.mark.parametrize("shuffle", [True, False])
def test_stage_matches_a_plain_fill_over_changing_steps(shuffle):
    """``shuffle``: rows in a new order each step; else in admission order, so the rows after a
    finished sequence shift up (the common case in a decode batch: each of those rows now holds
    the next sequence's table)."""
    rng = random.Random(0 if shuffle else 1)
    B, M, T = 16, 12, 4
    g = _graphs(B, M, T)
    seqs = {}  # seq -> (table tuple, position)
    for step in range(60):
        # grow some sequences (new block -> new tuple), add and drop others
        for s in list(seqs):
            table, p = seqs[s]
            p += 1
            if p >= len(table) * T:
                table = table + (rng.randrange(100, 999),)
            if p >= (M - 1) * T or rng.random() < 0.05:
                del seqs[s]
            else:
                seqs[s] = (table, p)
        while len(seqs) < rng.randint(1, 9):
            s = rng.randrange(10**6)
            seqs[s] = (tuple(rng.randrange(100, 999) for _ in range(rng.randint(1, 3))), 0)
        order = list(seqs)
        if shuffle:
            rng.shuffle(order)
        rows = [(rng.randrange(50), seqs[s][1], seqs[s][0]) for s in order]
        if step % 7 == 3:  # a prompt chunk: several rows sharing one table
            table = tuple(rng.randrange(100, 999) for _ in range(3))
            rows += [(rng.randrange(50), p, table) for p in range(5)]
        rows = rows[:B]
        bs = next(b for b in (1, 2, 4, 8, 16) if b >= len(rows))
        prev = g._host_np[5 * B:].reshape(B, M).copy()
        want = _expected(rows, bs, B, M, T, prev)
        g._stage(rows, bs)
        got = g._host_np
        for region in range(5):
            lo = region * B
            assert np.array_equal(got[lo:lo + bs], want[lo:lo + bs]), (step, region)
        for i, (_, _, table) in enumerate(rows):  # the part of each table the kernels read
            assert np.array_equal(got[5 * B:].reshape(B, M)[i, :len(table)], table), (step, i)
        assert torch.equal(g._dev, g._host)


def test_stage_skips_a_table_already_in_its_row():
    B, M, T = 4, 6, 4
    g = _graphs(B, M, T)
    table = (7, 8, 9)
    g._stage([(1, 5, table)], 1)
    tables = g._host_np[5 * B:].reshape(B, M)
    tables[0, 0] = -5  # a write the next stage must not repeat if it skips the row
    g._stage([(2, 6, table)], 1)
    assert tables[0, 0] == -5 and g._host_np[0] == 2 and g._host_np[B] == 6
    g._stage([(2, 6, tuple([7, 8, 9]))], 1)  # an equal but new tuple: written again
    assert tables[0, 0] == 7


def test_stage_for_several_steps_puts_each_step_a_position_further():
    B, M, T, S = 8, 6, 4, 3
    g = _graphs(B, M, T, steps=S)
    rows = [(5, 2, (10, 11)), (6, 7, (20, 21, 22)), (7, 3, (30, 31))]  # 3 + 2 crosses a block
    g._stage(rows, 4, steps=S)
    host = g._host_np
    for k in range(S):
        base = B + 4 * B * k  # ids [B], then (pos, block, offset, len) [B each] a step
        pos, blocks, offs, lens = (host[base + i * B:base + i * B + 4] for i in range(4))
        want = [p + k for _, p, _ in rows]
        assert list(pos[:3]) == want and list(lens[:3]) == [p + 1 for p in want]
        assert list(blocks[:3]) == [t[(p + k) // T] for _, p, t in rows]
        assert list(offs[:3]) == [p % T for p in want]
        assert (pos[3], blocks[3], offs[3], lens[3]) == (0, -1, 0, 0)  # padding, every step
    assert list(host[:4]) == [5, 6, 7, 0]
    tables = host[B + 4 * B * S:].reshape(B, M)
    assert [list(tables[i, :len(t)]) for i, (_, _, t) in enumerate(rows)] == [list(t) for _, _, t in rows]
    assert torch.equal(g._dev, g._host)
