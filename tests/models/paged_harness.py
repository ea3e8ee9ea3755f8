"""A tiny driver of the real paged path for model tests (the engine lives elsewhere).

It owns a ``KVPool`` whose ``block_bytes`` gives the model a tokens-per-block that is not a power of
two, hands out blocks in a shuffled order (so a sequence's blocks are never contiguous), and runs
steps of several sequences in one forward, decodes first as ``build_attention_metadata`` requires.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from modelhive.engine.kv_pool import BLOCK_ALIGN_BYTES, KVLayout, KVPool
from modelhive.models.base import CausalLM
from modelhive.runner.attn_metadata import SeqChunk, build_attention_metadata


def block_bytes_for(bytes_per_token: int, min_tokens: int) -> tuple[int, int]:
    """(block_bytes, tokens_per_block): the first T >= min_tokens that is not a power of two and
    that an aligned block size gives exactly (T * bytes_per_token <= B < (T + 1) * bytes_per_token)."""
    for tokens in range(min_tokens, min_tokens + 64):
        if tokens & (tokens - 1) == 0:
            continue
        block_bytes = -(-tokens * bytes_per_token // BLOCK_ALIGN_BYTES) * BLOCK_ALIGN_BYTES
        if block_bytes < (tokens + 1) * bytes_per_token:
            return block_bytes, tokens
    raise ValueError(f"no aligned block size for {bytes_per_token} bytes per token")


def _split(tokens: list[int], num_chunks: int) -> list[list[int]]:
    """``tokens`` in ``num_chunks`` consecutive chunks of near-equal length."""
    bounds = [round(i * len(tokens) / num_chunks) for i in range(num_chunks + 1)]
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass
class Sequence:
    num_cached: int = 0
    block_table: list[int] = field(default_factory=list)


class PagedHarness:
    def __init__(self, model: CausalLM, kv_dtype: str = "float32", min_tokens_per_block: int = 5,
                 num_blocks: int = 96, seed: int = 0):
        self.model = model
        self.arch = model.arch
        block_bytes, _ = block_bytes_for(self.arch.kv_bytes_per_token(kv_dtype),
                                         min_tokens_per_block)
        self.layout = KVLayout.for_model(self.arch, kv_dtype, block_bytes)
        self.pool = KVPool(num_blocks, block_bytes)
        self.kv_caches = self.pool.layer_views(self.layout)
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.seqs: list[Sequence] = []

    @property
    def tokens_per_block(self) -> int:
        return self.layout.tokens_per_block

    def new_sequence(self) -> int:
        self.seqs.append(Sequence())
        return len(self.seqs) - 1

    @torch.inference_mode()
    def step(self, work: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """One forward over ``(seq_id, new_tokens)`` pairs; returns, per pair in the given order,
        the float32 logits ``[len(new_tokens), vocab]`` of every fed token."""
        is_decode = [len(toks) == 1 and self.seqs[s].num_cached > 0 for s, toks in work]
        order = sorted(range(len(work)), key=lambda i: not is_decode[i])  # stable: decodes first
        chunks, input_ids = [], []
        for i in order:
            seq_id, tokens = work[i]
            seq = self.seqs[seq_id]
            while len(seq.block_table) * self.tokens_per_block < seq.num_cached + len(tokens):
                seq.block_table.append(self.free_blocks.pop())
            chunks.append(SeqChunk(seq.num_cached, len(tokens), tuple(seq.block_table)))
            input_ids.extend(tokens)
        meta = build_attention_metadata(chunks, self.tokens_per_block)
        assert meta.num_decodes == sum(is_decode)
        hidden = self.model(torch.tensor(input_ids, dtype=torch.long), meta, self.kv_caches)
        logits = self.model.compute_logits(hidden)
        out: list[torch.Tensor] = [torch.empty(0)] * len(work)
        qsl = meta.query_start_loc_host
        for row, i in enumerate(order):
            out[i] = logits[qsl[row]:qsl[row + 1]]
            self.seqs[work[i][0]].num_cached += len(work[i][1])
        return out

    def prefill_then_decode(self, prompt: list[int], continuation: list[int],
                            num_chunks: int = 2) -> torch.Tensor:
        """Teacher-forced: prefill ``prompt`` in ``num_chunks`` chunks, then feed ``continuation``
        one decode step per token. Returns logits ``[len(prompt) + len(continuation), vocab]``."""
        seq = self.new_sequence()
        rows = [self.step([(seq, chunk)])[0] for chunk in _split(prompt, num_chunks)]
        rows += [self.step([(seq, [tok])])[0] for tok in continuation]
        return torch.cat(rows)

    def greedy(self, prompt: list[int], max_new_tokens: int, num_chunks: int = 2) -> list[int]:
        """Greedy generation: chunked prefill, then one decode step per new token."""
        seq = self.new_sequence()
        for chunk in _split(prompt, num_chunks):
            last = self.step([(seq, chunk)])[0][-1]
        generated = [int(last.argmax())]
        while len(generated) < max_new_tokens:
            generated.append(int(self.step([(seq, generated[-1:])])[0][-1].argmax()))
        return generated
