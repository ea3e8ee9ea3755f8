"""CUDA graphs per (model, row-count bucket), and one-copy staging of step inputs.

A graph row is one token: ``(token id, position, block table)``; it attends to the keys of its
sequence at positions ``<= position``. A decode is one row; a prompt chunk of n tokens is n rows
sharing one block table (each layer stores the keys of all rows before any row attends, so row j
sees rows < j of its chunk: causal prefill). So every step of at most ``graph_max_rows`` tokens
(decodes, short prompts such as "Hello", or both) replays ONE graph: the smallest captured bucket
``>= rows`` (``planner.estimates.graph_batch_sizes``: 1, 2, 4, multiples of 8, the max). Longer
steps replay a prefill graph (``runner/prefill_graphs.py``). Each graph runs the model forward,
the logits projection and each row's greedy token (``ops.argmax``: a greedy step needs no kernel
outside the graph) into static buffers:

    input_ids [B] | (positions, slot_blocks, slot_offsets, seq_lens) [S, 4, B] | tables [B, M]

all int32, laid out in ONE device buffer, filled from ONE pinned host buffer with ONE
``non_blocking`` copy per step (``M = cdiv(max_model_len, T)``: block tables are padded to the
longest sequence the model allows; S = 1 without multi-step graphs). The host fills it with a
few numpy operations whatever the row count: the rows' tables first, then every step's slot
blocks gathered from them (one fancy index), not one Python lookup per row and step. The
graph-safe metadata keeps shapes fixed per bucket: the attention kernels size their split-K grid
from the table width, never from host lengths. Rows past ``n`` are padding: block id -1
(store-KV skips them, so padding never touches the pool) and length 0 (attention writes zeros).

Multi-step graphs (``steps`` S > 1): each bucket also gets a graph of S decode steps in a row,
step k+1 fed the greedy tokens of step k on the device, at the rows' positions + k (their
metadata staged by the host with step 0's, in the same copy). ``runner/decode_ahead.py`` runs
them for all-greedy decode batches: one replay and one host round trip per S tokens, and the
step boundaries inside the graph run back to back (no staging copy, no launch between them).

All graphs of all models of one engine share one CUDA graph memory pool (``capture_cuda_graphs``
passes it): steps run one model at a time and each step reads its logits before the next replay,
so the activations of the largest capture are the only graph memory the engine holds (what
``planner.estimates.graph_bytes`` counts, per model, as an upper bound). The pool lives as long
as the engine's graphs (a handle is never reused after its graphs are gone: the allocator forbids
it). The shared KV pool is outside the graph pool, and so are the static outputs: the greedy
tokens (a step launched ahead keeps them while the other models replay; a static output inside
the pool may sit where an earlier capture had transients, and was overwritten that way in the
GPU engine test) and the logits, one buffer per model and dtype whose first rows every bucket
writes (``out=`` of the LM head), so the buckets' logits take ``max_batch`` rows, not the sum
of the bucket sizes.

``stage_eager_inputs`` does the same one-copy staging for the eager path (long prefills):
metadata built on the CPU, packed into two pinned tensors (int64, int32), copied non-blocking.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from modelhive.engine.sequence import ScheduledSeq
from modelhive.kernels import ops
from modelhive.models.base import CausalLM, KVCaches
from modelhive.planner.estimates import DECODE_STEPS, graph_batch_sizes
from modelhive.runner.attn_metadata import AttentionMetadata, SeqChunk, metadata_arrays

log = logging.getLogger("modelhive.runner")

#: one graph row: (token id, position, the sequence's block table)
GraphRow = tuple[int, int, tuple[int, ...]]


def token_rows(seqs: Sequence[ScheduledSeq]) -> tuple[list[GraphRow], list[int]]:
    """Every token of every sequence's chunk as a graph row, and per sequence the index of the
    row of its last token (whose logits it samples from)."""
    rows: list[GraphRow] = []
    last: list[int] = []
    for s in seqs:
        table = s.block_table
        rows.extend((tok, s.num_cached + j, table) for j, tok in enumerate(s.token_ids))
        last.append(len(rows) - 1)
    return rows, last


#: a padding row's (position, slot block, slot offset, length): block -1 makes store-KV skip it,
#: length 0 makes attention write zeros
_PADDING = np.array([0, -1, 0, 0], dtype=np.int32)[:, None]


class DecodeGraphs:
    """Captured graphs of one model; ``replay(rows)`` runs the smallest bucket that holds them."""

    def __init__(self, model: CausalLM, kv_caches: KVCaches, tokens_per_block: int,
                 max_num_seqs: int, max_model_len: int, device: torch.device,
                 batch_sizes: Sequence[int] | None = None, pool=None, steps: int = 1):
        self.model = model
        self.kv_caches = kv_caches
        self.tokens_per_block = tokens_per_block
        self.device = device
        self.batch_sizes = sorted(set(batch_sizes or graph_batch_sizes(max_num_seqs)))
        self.max_batch = self.batch_sizes[-1]
        self.max_blocks = -(-max_model_len // tokens_per_block)
        self.steps = steps
        B, M = self.max_batch, self.max_blocks
        self._host = torch.zeros(self.buffer_size(), dtype=torch.int32, pin_memory=True)
        self._host_views()
        self._dev = torch.zeros_like(self._host, device=device)
        self._copied = torch.cuda.Event()
        self._copied.record()
        self.input_ids = self._dev[:B]
        # per step: positions, slot_blocks, slot_offsets, seq_lens (``_meta``)
        self._dev_meta = self._dev[B:B + 4 * B * steps].view(steps, 4, B)
        self.block_tables = self._dev[B + 4 * B * steps:].view(B, M)
        self.query_start_loc = torch.arange(B + 1, dtype=torch.int32, device=device)
        # Every bucket's greedy tokens, OUTSIDE the graph pool: a graph's static outputs in the
        # pool may lie where an earlier capture (of any model) had transients, so any replay
        # can overwrite them; these tokens must outlive the other models' replays until this
        # model's next step takes them (``runner/decode_ahead.py``).
        self.greedy = torch.zeros(B, dtype=torch.int64, device=device)
        # the multi-step graphs' tokens, step by step (outside the pool for the same reason)
        self.step_tokens = torch.zeros(steps, B, dtype=torch.int64, device=device)
        # every bucket's logits: rows [:bs] of one buffer per dtype (float32 from the GEMV's
        # rows, else the model dtype: ``ops.logits``), outside the pool (module docstring)
        self.logits_buffers: dict[torch.dtype, torch.Tensor] = {}
        # bucket -> (graph, its static logits [bs, vocab], its static greedy tokens [bs])
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.multi_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # bucket -> its S-step graph
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()

    def buffer_size(self) -> int:
        """int32 words of the staging buffer (module docstring)."""
        B = self.max_batch
        return B + 4 * B * self.steps + B * self.max_blocks

    def _host_views(self) -> None:
        """numpy views of the pinned buffer ``self._host`` that ``_stage`` fills."""
        B, S = self.max_batch, self.steps
        host = self._host_np = self._host.numpy()
        self._host_meta = host[B:B + 4 * B * S].reshape(S, 4, B)
        self._host_tables = host[B + 4 * B * S:].reshape(B, self.max_blocks)
        self._row_tables: list = [None] * B  # the table object each host row holds
        self._row_index = np.arange(B)
        self._step_offsets = np.arange(S, dtype=np.int32)[:, None]  # step k: positions + k

    def _meta(self, bs: int, k: int = 0) -> AttentionMetadata:
        bound = self.max_blocks * self.tokens_per_block
        positions, slot_blocks, slot_offsets, seq_lens = self._dev_meta[k]
        return AttentionMetadata(
            tokens_per_block=self.tokens_per_block,
            num_decodes=bs,
            positions=positions[:bs],
            slot_blocks=slot_blocks[:bs],
            slot_offsets=slot_offsets[:bs],
            query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            query_start_loc_host=tuple(range(bs + 1)),
            seq_lens_host=(bound,) * bs,  # an upper bound: graph kernels never read it
        )

    def _stage(self, rows: Sequence[GraphRow], bs: int, steps: int = 1) -> None:
        """Fill the pinned buffer for ``rows`` padded to ``bs`` rows and copy it once;
        ``steps`` > 1: also steps 1 .. steps-1, each row one position further a step (its table
        covers them: the caller checked).

        A row's block table is written only when it is not the table object that row already
        holds: the scheduler hands out the same tuple while a sequence's table is unchanged
        (``Sequence.table_tuple``), so a steady decode batch restages only its scalars."""
        T = self.tokens_per_block
        self._copied.synchronize()  # the previous step's copy has read the pinned buffer
        n = len(rows)
        tables = self._host_tables
        staged = self._row_tables
        for i, row in enumerate(rows):
            table = row[2]
            if staged[i] is not table:
                if i and table is rows[i - 1][2]:  # rows of one chunk share the table
                    tables[i] = tables[i - 1]
                else:
                    tables[i, :len(table)] = table
                staged[i] = table
        ids = self._host_np[:bs]
        meta = self._host_meta[:steps, :, :bs]  # [steps, (pos, block, offset, len), rows]
        if n:
            ids[:n] = np.fromiter((r[0] for r in rows), dtype=np.int32, count=n)
            at = np.fromiter((r[1] for r in rows), dtype=np.int32, count=n)
            if steps > 1:
                at = at + self._step_offsets[:steps]  # [steps, n]
            live = meta[:, :, :n]
            live[:, 0] = at
            # each row's slot block from the table just staged (it covers every step's slot)
            live[:, 1] = tables[self._row_index[:n], at // T]
            live[:, 2] = at % T
            live[:, 3] = at + 1
        ids[n:] = 0
        meta[:, :, n:] = _PADDING
        self._dev.copy_(self._host, non_blocking=True)
        self._copied.record()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (smaller ones reuse its memory)."""
        start = time.perf_counter()
        pool = self.pool
        for bs in reversed(self.batch_sizes):
            self._stage((), bs)  # all padding: nothing is written to the KV pool
            meta = self._meta(bs)
            ids = self.input_ids[:bs]
            # eager warm-up: compiles the Triton kernels and lets cuBLAS pick its algorithms
            greedy = self.greedy[:bs]
            warm = self.model.compute_logits(self.model(ids, meta, self.kv_caches))
            ops.argmax(warm, greedy)
            buffer = self.logits_buffers.get(warm.dtype)
            if buffer is None:  # the largest bucket of this dtype comes first
                buffer = self.logits_buffers[warm.dtype] = torch.empty_like(warm)
            del warm
            logits = buffer[:bs]
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.model.compute_logits(self.model(ids, meta, self.kv_caches), out=logits)
                ops.argmax(logits, greedy)
            self.graphs[bs] = (graph, logits, greedy)
            if self.steps > 1:
                self._stage((), bs, self.steps)
                self._run_steps(bs)  # eager warm-up: later steps' metadata may differ in alignment
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._run_steps(bs)
                self.multi_graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured %d decode graphs (batch sizes %s%s) in %.1f s",
                 len(self.graphs) + len(self.multi_graphs), self.batch_sizes,
                 f"; each also {self.steps} steps in one graph" if self.multi_graphs else "",
                 time.perf_counter() - start)

    def _run_steps(self, bs: int) -> None:
        """The multi-step graph's body: ``steps`` forwards, step k + 1 fed step k's tokens."""
        for k in range(self.steps):
            ids = self.input_ids[:bs] if k == 0 else self.step_tokens[k - 1, :bs]
            logits = self.model.compute_logits(self.model(ids, self._meta(bs, k), self.kv_caches))
            ops.argmax(logits, self.step_tokens[k, :bs])
            del logits  # the next step reuses its memory

    def fits(self, rows: Sequence[GraphRow]) -> bool:
        """The rows fit a captured bucket (count, and block-table width)."""
        return len(rows) <= self.max_batch and all(len(r[2]) <= self.max_blocks for r in rows)

    def fits_steps(self, rows: Sequence[GraphRow]) -> bool:
        """The rows fit a captured multi-step graph, each row's table covering every step."""
        T, S = self.tokens_per_block, self.steps
        return S > 1 and self.fits(rows) and all(r[1] + S <= len(r[2]) * T for r in rows)

    def replay_steps(self, rows: Sequence[GraphRow], input_ids: torch.Tensor) -> torch.Tensor:
        """Greedy tokens ``[steps, len(rows)]`` (int64) of ``steps`` decode steps from ``rows``
        (each row's token fed at its position, then its own greedy tokens one position further
        a step); ``input_ids``: the first step's ids on the device. The caller checked
        ``fits_steps``. A static buffer: it holds until this model's next replay."""
        n = len(rows)
        bs = next(b for b in self.batch_sizes if b >= n)
        self._stage(rows, bs, self.steps)
        self.input_ids[:n].copy_(input_ids)
        self.multi_graphs[bs].replay()
        return self.step_tokens[:, :n]

    def replay(self, rows: Sequence[GraphRow], input_ids: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[len(rows), vocab]`` of one replay (``compute_logits``'s dtype) and each row's
        greedy token (int64 ``[len(rows)]``); the caller checked ``fits``.
        ``input_ids``: the rows' token ids as a device tensor, overriding the rows' own (a step
        launched before its tokens reached the host: ``runner/decode_ahead.py``).
        Both are static buffers: they hold until this model's next replay (use them on the
        stream before)."""
        n = len(rows)
        bs = next(b for b in self.batch_sizes if b >= n)
        self._stage(rows, bs)
        if input_ids is not None:
            self.input_ids[:n].copy_(input_ids)
        graph, logits, greedy = self.graphs[bs]
        graph.replay()
        return logits[:n], greedy[:n]


def stage_eager_inputs(chunks: list[SeqChunk], token_ids: Sequence[int], tokens_per_block: int,
                       device: torch.device) -> tuple[AttentionMetadata, torch.Tensor]:
    """(metadata, input_ids) on the CUDA ``device``, built on the CPU and moved with two
    non-blocking copies from pinned memory (instead of one blocking copy per tensor)."""
    a = metadata_arrays(chunks, tokens_per_block)
    n = len(token_ids)
    longs = torch.empty(4 * n, dtype=torch.long, pin_memory=True)
    longs_np = longs.numpy()
    longs_np[:n] = token_ids
    longs_np[n:2 * n] = a.positions
    longs_np[2 * n:3 * n] = a.slot_blocks
    longs_np[3 * n:] = a.slot_offsets
    num_seqs = len(chunks)
    tables = a.block_tables
    ints = torch.empty(2 * num_seqs + 1 + tables.size, dtype=torch.int32, pin_memory=True)
    ints_np = ints.numpy()
    ints_np[:num_seqs + 1] = a.query_start_loc
    ints_np[num_seqs + 1:2 * num_seqs + 1] = a.seq_lens
    ints_np[2 * num_seqs + 1:] = tables.reshape(-1)
    longs_dev = longs.to(device, non_blocking=True)
    ints_dev = ints.to(device, non_blocking=True)
    qsl_host, lens_host = a.host_tuples()
    dev_meta = AttentionMetadata(
        tokens_per_block=tokens_per_block,
        num_decodes=a.num_decodes,
        positions=longs_dev[n:2 * n],
        slot_blocks=longs_dev[2 * n:3 * n],
        slot_offsets=longs_dev[3 * n:],
        query_start_loc=ints_dev[:num_seqs + 1],
        seq_lens=ints_dev[num_seqs + 1:2 * num_seqs + 1],
        block_tables=ints_dev[2 * num_seqs + 1:].view(tables.shape),
        query_start_loc_host=qsl_host,
        seq_lens_host=lens_host,
    )
    return dev_meta, longs_dev[:n]


def decode_lookahead(decode_steps: int) -> int:
    """KV slots a decode needs reserved past its token (``Scheduler.lookahead``): decode-ahead
    writes the next token's; a multi-step launch taken at a step launches the next one from
    there, ``2 S - 1`` tokens past it."""
    return max(1, 2 * decode_steps - 1)


def capture_cuda_graphs(engine, decode_steps: int = DECODE_STEPS) -> int:
    """Capture the graphs of every model of ``engine`` on CUDA (``build_engine`` does, unless
    ``enforce_eager``; the planner reserved their memory); returns how many graphs."""
    total = 0
    pool = None
    for loaded in engine.models.values():
        runner = loaded.runner
        if runner.device.type != "cuda":
            continue
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        limits = loaded.limits
        runner.enable_cuda_graphs(limits.max_num_seqs, limits.max_model_len, pool,
                                  limits.max_num_batched_tokens, decode_steps)
        total += len(runner.decode_graphs.graphs) + len(runner.decode_graphs.multi_graphs)
        if runner.prefill_graphs is not None:
            total += len(runner.prefill_graphs.graphs)
    if total:
        engine.scheduler.lookahead = decode_lookahead(decode_steps)
        # the warm-up runs before each capture left their activations in the allocator's
        # cache; the graphs now hold theirs in the pool
        torch.cuda.empty_cache()
    return total
