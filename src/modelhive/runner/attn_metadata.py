"""AttentionMetadata: everything attention needs for one model's forward in one step.

It is an explicit argument of every model forward (no global forward context). Tokens of the step
are flat ``[num_tokens]``; sequences are ordered decodes first (exactly one new token each), then
prefill/extend chunks (one or more new tokens, whose keys follow the sequence's cached tokens).

Units: positions and lengths in tokens; ``block_tables`` holds pool block ids; a token at position
``p`` of a sequence lives in block ``block_tables[seq, p // tokens_per_block]`` at offset
``p % tokens_per_block``.

Graph mode (``runner/prefill_graphs.py``: a step of many tokens replayed from a graph captured per
token count): every tensor is a static buffer and the kernels' grids cannot come from the host,
so ``num_decodes`` is the decode grid's row bound, ``decode_count`` (on the device) says how many
of those rows are decodes this step, and ``prefill_tiles`` lists the prefill programs as
(sequence, tile of ``prefill_block_m`` queries), padded with (-1, -1).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a step, as the runner sees it (plain Python)."""

    num_cached: int  # tokens already in the KV cache before this step
    num_new: int  # tokens fed this step (1 for a decode)
    block_table: tuple[int, ...]  # pool blocks covering at least num_cached + num_new tokens


@dataclass(frozen=True, eq=False)
class AttentionMetadata:
    tokens_per_block: int
    num_decodes: int  # the first num_decodes sequences (and tokens) are decodes
    positions: torch.Tensor  # [num_tokens] int64
    slot_blocks: torch.Tensor  # [num_tokens] int64: block of each new token
    slot_offsets: torch.Tensor  # [num_tokens] int64: offset inside that block
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: tokens in cache after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    query_start_loc_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]
    decode_count: torch.Tensor | None = None  # graph mode: [1] int32
    prefill_tiles: torch.Tensor | None = None  # graph mode: [slots, 2] int32
    prefill_block_m: int = 0  # graph mode: queries per prefill tile

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_host[-1]

    @cached_property
    def decode_blocks(self) -> tuple[torch.Tensor, int]:
        """(block ids ``[D * nb]`` int64, ``nb``): the first ``nb = ceil(max decode len / T)``
        blocks of every decode's table, row after row (padding entries point at block 0 and are
        masked by ``decode_bias``). Gathering whole blocks with one ``index_select`` per layer is
        the CPU reference path's K/V read; computed once per step."""
        d = self.num_decodes
        nb = -(-max(self.seq_lens_host[:d]) // self.tokens_per_block)
        return self.block_tables[:d, :nb].reshape(-1).long(), nb

    @cached_property
    def _decode_biases(self) -> dict[int | None, torch.Tensor]:
        return {}

    def decode_bias(self, sliding_window: int | None) -> torch.Tensor:
        """``[D, 1, nb * T]`` float32: 0 where a key of the gathered blocks is visible to the
        decode (position < its length, and inside the window if any), else -inf. Built once per
        step and window, shared by all layers."""
        biases = self._decode_biases
        if sliding_window not in biases:
            _, nb = self.decode_blocks
            key_pos = torch.arange(nb * self.tokens_per_block, device=self.positions.device)
            lens = self.seq_lens[: self.num_decodes].long().unsqueeze(1)
            visible = key_pos.unsqueeze(0) < lens
            if sliding_window is not None:
                visible &= key_pos.unsqueeze(0) > (lens - 1 - sliding_window)
            zero = torch.zeros((), dtype=torch.float32, device=key_pos.device)
            biases[sliding_window] = torch.where(visible, zero, float("-inf")).unsqueeze(1)
        return biases[sliding_window]

    def logits_indices(self) -> torch.Tensor:
        """Row of the last token of every sequence (the rows that get logits)."""
        ends = torch.tensor(self.query_start_loc_host[1:], dtype=torch.long) - 1
        return ends.to(self.positions.device)


def prefill_block_m(head_dim: int) -> int:
    """Queries per program of the prefill/extend attention kernel."""
    return 64 if head_dim <= 128 else 32


def prefill_tiles(query_start_loc: np.ndarray, num_decodes: int, block_m: int,
                  slots: int) -> np.ndarray:
    """``[slots, 2]`` int32: (sequence, query tile) of every prefill/extend sequence's tiles of
    ``block_m`` queries, sequences ``num_decodes..`` in order, then (-1, -1)."""
    new = np.diff(query_start_loc.astype(np.int64))[num_decodes:]
    per_seq = -(-new // block_m)
    total = int(per_seq.sum())
    if total > slots:
        raise ValueError(f"{total} prefill tiles do not fit {slots} slots")
    out = np.full((slots, 2), -1, dtype=np.int32)
    seq = np.repeat(np.arange(num_decodes, num_decodes + len(new)), per_seq)
    starts = np.cumsum(per_seq) - per_seq
    out[:total, 0] = seq
    out[:total, 1] = np.arange(total) - np.repeat(starts, per_seq)
    return out


@dataclass(frozen=True)
class MetadataArrays:
    """The metadata of one step as host arrays (numpy), before they become tensors."""

    num_decodes: int
    positions: np.ndarray  # [num_tokens] int64
    slot_blocks: np.ndarray  # [num_tokens] int64
    slot_offsets: np.ndarray  # [num_tokens] int64
    query_start_loc: np.ndarray  # [num_seqs + 1] int32
    seq_lens: np.ndarray  # [num_seqs] int32
    block_tables: np.ndarray  # [num_seqs, max_blocks] int32, padded with 0

    def host_tuples(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(query_start_loc_host, seq_lens_host)`` of ``AttentionMetadata``."""
        return tuple(self.query_start_loc.tolist()), tuple(self.seq_lens.tolist())


def metadata_arrays(chunks: list[SeqChunk], tokens_per_block: int) -> MetadataArrays:
    """Positions, slots, lengths and padded tables of ``chunks`` (decodes first: chunks with
    num_new == 1 and num_cached > 0 at the front are counted as decodes), computed per token
    with numpy (a prefill step of 8192 tokens took ~9 ms in a per-token Python loop)."""
    num_decodes = 0
    for c in chunks:
        if c.num_new == 1 and c.num_cached > 0:
            num_decodes += 1
        else:
            break
    T = tokens_per_block
    num_seqs = len(chunks)
    cached = np.fromiter((c.num_cached for c in chunks), dtype=np.int64, count=num_seqs)
    new = np.fromiter((c.num_new for c in chunks), dtype=np.int64, count=num_seqs)
    widths = np.fromiter((len(c.block_table) for c in chunks), dtype=np.int64, count=num_seqs)
    ends = cached + new
    short = np.flatnonzero(widths * T < ends)
    if short.size:
        i = int(short[0])
        raise ValueError(f"block table of {int(widths[i])} blocks cannot hold {int(ends[i])} "
                         "tokens")
    max_blocks = int(widths.max())
    tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
    for i, c in enumerate(chunks):
        tables[i, :len(c.block_table)] = c.block_table
    qsl = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(new, out=qsl[1:])
    seq_of_token = np.repeat(np.arange(num_seqs), new)
    positions = cached[seq_of_token] + (np.arange(int(qsl[-1])) - qsl[seq_of_token])
    slot_blocks = tables[seq_of_token, positions // T].astype(np.int64)
    return MetadataArrays(num_decodes, positions, slot_blocks, positions % T,
                          qsl.astype(np.int32), ends.astype(np.int32), tables)


def build_attention_metadata(
    chunks: list[SeqChunk], tokens_per_block: int, device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """Build metadata for ``chunks`` (decodes must come first: chunks with num_new == 1 and
    num_cached > 0 at the front are counted as decodes)."""
    a = metadata_arrays(chunks, tokens_per_block)

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(device)

    qsl_host, lens_host = a.host_tuples()
    return AttentionMetadata(
        tokens_per_block=tokens_per_block,
        num_decodes=a.num_decodes,
        positions=tensor(a.positions),
        slot_blocks=tensor(a.slot_blocks),
        slot_offsets=tensor(a.slot_offsets),
        query_start_loc=tensor(a.query_start_loc),
        seq_lens=tensor(a.seq_lens),
        block_tables=tensor(a.block_tables),
        query_start_loc_host=qsl_host,
        seq_lens_host=lens_host,
    )
