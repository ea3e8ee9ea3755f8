"""Decode-ahead: while the host processes step t's tokens, the GPU already runs step t+1.

After a graph step in which every sequence samples (decodes, and prompts whose last chunk ran)
with a draw the device can make alone (greedy, temperature/top-k/top-p/min-p, seeded or not:
``sampler.choose``), the runner launches the next decode step of the same sequences at once, feeding the
tokens it just sampled on the device (no host round trip) at the next positions. Only then does it wait, and only for the
copy of step t's tokens to the host (queued before the step launched ahead). The engine applies
step t's tokens and schedules step t+1 as usual; when step t+1 is exactly the step launched ahead
(same sequences in the same order at the same positions), the runner returns the tokens already
computed and launches step t+2. So the host's per-step work (scheduling, detokenizing, stop
checks) overlaps the GPU's, instead of leaving the GPU idle between replays.

Anything else (a sequence finished on EOS or a stop string, a new prompt, a preemption, another
model's step in between) drops the step launched ahead. Its only side effect, K/V written one
position ahead into blocks its sequences held at launch, is harmless: every later step runs after
it on the same stream, so a block that changed hands is overwritten by its new owner, and a
continuing sequence rewrites the same values. A dropped step costs one wasted replay, so nothing
is launched ahead for a sequence that finishes deterministically (``max_tokens``,
``max_model_len``). The engine drops the step of a model that has no batch in a step
(``ModelRunner.skip_step``): a step launched ahead is only ever used by the very next step.

Needs one more KV slot per decode than the step itself (``Scheduler.lookahead = 1``, set by
``build_engine`` with CUDA graphs) so that position + 1 always has a slot. Penalties and
logprobs take the ordinary path (they need the host). A step launched ahead and then dropped has
consumed draws of the runner's generator: unseeded sampling stays a correct sample, and seeded
rows (keyed by seed and token index) are unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modelhive.engine.sampler import choose
from modelhive.engine.sequence import SampledToken, ScheduledSeq


def can_run_ahead(seqs: Sequence[ScheduledSeq]) -> bool:
    """Every sequence samples this step (a decode, or a prompt's last chunk) with a draw the
    device makes alone (``sampler.choose``: no penalties, which need the token history on the
    host, and no logprobs): the next step is then one decode per sequence."""
    return bool(seqs) and all(
        s.sample and not s.history and s.params.logprobs is None for s in seqs)


@dataclass
class _Ahead:
    key: tuple[tuple[str, int], ...]  # (seq_id, position) of each row
    tokens: torch.Tensor  # [rows] int64, on the device


class DecodeAhead:
    """One model's step launched ahead (at most one), over its ``DecodeGraphs``."""

    def __init__(self, graphs, max_model_len: int, generator: torch.Generator | None = None):
        self.graphs = graphs
        self.max_model_len = max_model_len
        self.generator = generator  # the runner's, for unseeded draws
        self._pending: _Ahead | None = None
        self._host = None  # pinned int64 [max rows]: this step's tokens, copied before the launch
        self._copied = None
        self.launched = 0
        self.used = 0

    def drop(self) -> None:
        self._pending = None

    def take(self, seqs: Sequence[ScheduledSeq]) -> torch.Tensor | None:
        """The device tokens of the step launched ahead if it is exactly this step, else None
        (and it is dropped either way)."""
        ahead, self._pending = self._pending, None
        if ahead is None or not can_run_ahead(seqs) or any(len(s.token_ids) != 1 for s in seqs):
            return None
        if tuple((s.seq_id, s.num_cached) for s in seqs) != ahead.key:
            return None
        self.used += 1
        return ahead.tokens

    def finish(self, seqs: Sequence[ScheduledSeq], tokens: torch.Tensor) -> list[SampledToken]:
        """Return this step's ``tokens`` (device, one per sequence) as SampledTokens;
        before waiting for them, launch the next step ahead when it is worth it."""
        n = len(seqs)
        if tokens.is_cuda:
            if self._host is None:
                self._host = torch.empty(self.graphs.max_batch, dtype=torch.int64,
                                         pin_memory=True)
                self._copied = torch.cuda.Event()
            host = self._host[:n]
            host.copy_(tokens[:n], non_blocking=True)
            self._copied.record()
        self._launch(seqs, tokens)
        if tokens.is_cuda:
            self._copied.synchronize()  # the copy only: the step launched ahead keeps running
            ids = host.tolist()
        else:
            ids = tokens[:n].tolist()
        return [SampledToken(s.seq_id, t) for s, t in zip(seqs, ids, strict=True)]

    def _launch(self, seqs: Sequence[ScheduledSeq], tokens: torch.Tensor) -> None:
        T = self.graphs.tokens_per_block
        positions = [s.num_cached + len(s.token_ids) for s in seqs]  # of the tokens sampled now
        for s, nxt in zip(seqs, positions, strict=True):
            if (s.num_generated + 1 >= s.params.max_tokens or nxt + 1 >= self.max_model_len
                    or nxt >= len(s.block_table) * T):
                return  # it finishes now for sure, or has no slot for its next token
        rows = [(0, nxt, s.block_table) for s, nxt in zip(seqs, positions, strict=True)]
        if not self.graphs.fits(rows):
            return
        logits = self.graphs.replay(rows, input_ids=tokens[:len(seqs)])
        # the sequences one token further: a seeded draw is keyed by its token index
        self._pending = _Ahead(tuple((s.seq_id, nxt) for s, nxt in zip(seqs, positions,
                                                                        strict=True)),
                               choose(logits, seqs, self.generator, ahead=1))
        self.launched += 1
