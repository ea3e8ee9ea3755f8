"""CUDA graphs for steps of many tokens (prompt chunks, with or without decodes), per token count.

A step of more tokens than the largest decode graph (``cuda_graphs.py``) used to run eagerly:
~120 Triton and ~100 cuBLAS launches from Python, 14 ms of host time per step on the GPU
machine's CPU against 14 ms of kernels for 8,192 tokens of Qwen2.5-0.5B (H200), so the GPU
waited on the host, and a prompt of 1,000 tokens paid the same ~14 ms of launches for ~2 ms of
kernels. Now such a step replays ONE graph: the smallest captured size
(``planner.estimates.prefill_graph_sizes``) that holds its tokens.

The graphs read static buffers, filled from one pinned host buffer with one copy per step
(int32, ``N`` = the largest size, ``S`` = ``max_num_seqs``, ``M`` = ``cdiv(max_model_len, T)``)::

    input_ids [N] | positions [N] | slot_blocks [N] | slot_offsets [N] | query_start_loc [S + 1]
    | seq_lens [S] | decode_count [1] | sampled rows [S] | prefill tiles [cdiv(N, bm) + S, 2]
    | block_tables [S, M]

Attention runs in graph mode (``attn_metadata.py``): the decode kernel covers ``S`` rows of which
``decode_count`` are decodes, the prefill kernel one program per entry of the tile map, so no
grid depends on the step. Rows past the step's tokens are padding: block id -1 (store-KV skips
them), no attention program writes them, and every other op is row-wise, so they never reach a
real row. The graph ends by gathering the sampled sequences' last rows ``[S, hidden]``; the LM
head and the sampler run eagerly on those rows. All graphs share the engine's CUDA graph pool
with the decode graphs: a step reads its output before the next replay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from modelhive.models.base import CausalLM, KVCaches
from modelhive.planner.estimates import graph_max_rows
from modelhive.runner.attn_metadata import (
    AttentionMetadata,
    SeqChunk,
    metadata_arrays,
    prefill_block_m,
    prefill_tiles,
)

log = logging.getLogger("modelhive.runner")


class PrefillGraphs:
    """Captured graphs of one model for steps of many tokens; ``replay`` runs the smallest size
    that holds a step."""

    def __init__(self, model: CausalLM, kv_caches: KVCaches, tokens_per_block: int,
                 max_num_seqs: int, max_model_len: int, sizes: Sequence[int],
                 device: torch.device, pool=None):
        """``sizes``: the token counts to capture (``planner.estimates.prefill_graph_sizes``)."""
        self.model = model
        self.kv_caches = kv_caches
        self.tokens_per_block = tokens_per_block
        self.device = device
        self.sizes = sorted(sizes)
        self.min_tokens = graph_max_rows(max_num_seqs) + 1  # fewer: the decode graphs
        self.max_tokens = self.sizes[-1]
        self.max_seqs = max_num_seqs
        self.max_blocks = -(-max_model_len // tokens_per_block)
        self.block_m = prefill_block_m(model.arch.head_dim)
        N, S, M = self.max_tokens, self.max_seqs, self.max_blocks
        self.max_slots = -(-N // self.block_m) + S
        lengths = [N, N, N, N, S + 1, S, 1, S, 2 * self.max_slots, S * M]
        offsets = np.cumsum([0, *lengths])
        self._host = torch.zeros(int(offsets[-1]), dtype=torch.int32, pin_memory=True)
        self._dev = torch.zeros(int(offsets[-1]), dtype=torch.int32, device=device)
        host_np = self._host.numpy()
        (self._ids, self._pos, self._blocks, self._offs, self._qsl, self._lens, self._count,
         self._last, self._tiles, tables) = (host_np[a:b] for a, b in zip(offsets[:-1],
                                                                         offsets[1:], strict=True))
        self._tables = tables.reshape(S, M)
        dev = [self._dev[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        (self.input_ids, self.positions, self.slot_blocks, self.slot_offsets,
         self.query_start_loc, self.seq_lens, self.decode_count, self.last_rows, tiles,
         block_tables) = dev
        self.tiles = tiles.view(self.max_slots, 2)
        self.block_tables = block_tables.view(S, M)
        self._copied = torch.cuda.Event()
        self._copied.record()
        # size -> (graph, its static output [S, hidden]: the sampled rows' hidden states)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.replays = 0

    def _slots(self, size: int) -> int:
        return -(-size // self.block_m) + self.max_seqs

    def _meta(self, size: int) -> AttentionMetadata:
        S = self.max_seqs
        return AttentionMetadata(
            tokens_per_block=self.tokens_per_block,
            num_decodes=S,  # the decode grid's rows; decode_count says how many are decodes
            positions=self.positions[:size],
            slot_blocks=self.slot_blocks[:size],
            slot_offsets=self.slot_offsets[:size],
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            query_start_loc_host=(0,) * (S + 1),  # graph kernels never read these
            seq_lens_host=(0,) * S,
            decode_count=self.decode_count,
            prefill_tiles=self.tiles[:self._slots(size)],
            prefill_block_m=self.block_m,
        )

    def fits(self, chunks: Sequence[SeqChunk], num_tokens: int) -> bool:
        """A captured size holds the step (tokens, sequences, block-table width)."""
        return (self.min_tokens <= num_tokens <= self.max_tokens and len(chunks) <= self.max_seqs
                and all(len(c.block_table) <= self.max_blocks for c in chunks))

    def _stage(self, chunks: Sequence[SeqChunk], token_ids: Sequence[int], sampled: list[int],
               size: int) -> None:
        """Fill the pinned buffer for the step padded to ``size`` tokens and copy it once."""
        self._copied.synchronize()  # the previous step's copy has read the pinned buffer
        n, ns = len(token_ids), len(chunks)
        if chunks:
            a = metadata_arrays(list(chunks), self.tokens_per_block)
            self._ids[:n] = token_ids
            self._pos[:n] = a.positions
            self._blocks[:n] = a.slot_blocks
            self._offs[:n] = a.slot_offsets
            self._qsl[:ns + 1] = a.query_start_loc
            self._lens[:ns] = a.seq_lens
            self._count[0] = a.num_decodes
            self._last[:len(sampled)] = a.query_start_loc[1:][sampled] - 1
            self._tables[:ns, :a.block_tables.shape[1]] = a.block_tables
            self._tiles[:2 * self._slots(size)] = prefill_tiles(
                a.query_start_loc, a.num_decodes, self.block_m, self._slots(size)).reshape(-1)
        else:  # all padding (capture)
            self._count[0] = 0
            self._tiles[:] = -1
        self._ids[n:size] = 0
        self._pos[n:size] = 0
        self._blocks[n:size] = -1
        self._offs[n:size] = 0
        self._qsl[ns + 1:] = n
        self._lens[ns:] = 0
        self._last[len(sampled):] = 0
        self._dev.copy_(self._host, non_blocking=True)
        self._copied.record()

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self._meta(size), self.kv_caches)
        return hidden.index_select(0, self.last_rows)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first (smaller ones reuse its memory), each after one
        eager warm-up run (compiles its kernel variants, lets cuBLAS pick its algorithms)."""
        start = time.perf_counter()
        for size in reversed(self.sizes):
            self._stage((), (), [], size)  # all padding: nothing is written to the KV pool
            self._forward(size)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(size)
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        log.info("captured %d prefill graphs (token counts %s) in %.1f s", len(self.graphs),
                 self.sizes, time.perf_counter() - start)

    def replay(self, chunks: Sequence[SeqChunk], token_ids: Sequence[int],
               sampled: list[int]) -> torch.Tensor:
        """The hidden states ``[len(sampled), hidden]`` of the last token of the sequences
        ``sampled`` (indices into ``chunks``) after one replay; the caller checked ``fits``.
        A static buffer: valid until the engine's next graph replay."""
        size = next(s for s in self.sizes if s >= len(token_ids))
        self._stage(chunks, token_ids, sampled, size)
        graph, out = self.graphs[size]
        graph.replay()
        self.replays += 1
        return out[:len(sampled)]
