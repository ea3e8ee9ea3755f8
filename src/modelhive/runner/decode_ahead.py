"""Decode-ahead: while the host processes step t's tokens, the GPU already runs step t+1.

After a graph step in which every sequence samples (decodes, and prompts whose last chunk ran;
any sampling settings: greedy, temperature/top-k/top-p/min-p, seeded or not, penalties,
logprobs: ``sampler.choose`` and ``sampler.logprobs`` run on the device), the runner launches
the next decode step of the same sequences at once, feeding the tokens it just sampled on the
device (no host round trip) at the next positions. Only then does it wait, and only for the copy
of step t's tokens (and logprobs) to the host (queued before the step launched ahead). The
engine applies step t's tokens and schedules step t+1 as usual; when step t+1 is the step
launched ahead, or that step less some of its sequences (those that finished or were preempted;
the others in the same order at the same positions), the runner returns the tokens already
computed (of the rows kept) and launches step t+2. So the host's per-step work (scheduling,
detokenizing, stop checks) overlaps the GPU's, instead of leaving the GPU idle between replays.

Anything else (a new prompt, a reordering, another model's step in between) drops the step
launched ahead. The only side effect of a dropped step, or of a row whose sequence is gone, is
K/V written one position ahead into blocks its sequences held at launch; it is harmless: every
later step runs after it on the same stream, so a block that changed hands is overwritten by its
new owner, and a continuing sequence rewrites the same values. A sequence that finishes
deterministically (``max_tokens``, ``max_model_len``) is launched ahead with the others (its row
is wasted work), so that it does not stall the rest; only when every row finishes now is nothing
launched. The engine drops the step of a model that has no batch in a step
(``ModelRunner.skip_step``): a step launched ahead is only ever used by the very next step.

Multi-step launches: when every row is greedy without penalties or logprobs, some row still
needs at least S more tokens, and the model has S-step graphs (``DecodeGraphs.steps``,
``planner.estimates.DECODE_STEPS``), the step launched ahead is S decode steps in one replay.
The engine step that takes it waits for all S tokens (one host round trip), hands out the first,
and the next S - 1 engine steps hand out the rest from the host (``_later``: same rows less
finished ones, same positions) without touching the device; the next launch (1 or S steps)
leaves when the first of them is taken, so the GPU runs the next S steps while the host walks
through these. A reply's last tokens (fewer than S left in every row) go one step a replay, so
its end waits for no steps past it.

Needs KV slots past the step itself: ``Scheduler.lookahead`` = 2 S - 1 (1 without multi-step
graphs), set by ``capture_cuda_graphs``, so that every position launched ahead has a slot.
Penalties see the tokens the host has not seen yet: the launch hands the sampler the step's
device tokens beside each row's history (``choose``'s ``pending``). A step launched ahead and
then dropped (or a row of it) has consumed draws of the runner's generator: unseeded sampling
stays a correct sample, and seeded rows (keyed by seed and token index) are unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modelhive.engine.sampler import choose, device_index, logprobs, sampled_tokens
from modelhive.engine.sequence import SampledToken, ScheduledSeq


def can_run_ahead(seqs: Sequence[ScheduledSeq]) -> bool:
    """Every sequence samples this step (a decode, or a prompt's last chunk): the next step is
    then one decode per sequence."""
    return bool(seqs) and all(s.sample for s in seqs)


@dataclass
class _Ahead:
    key: tuple[tuple[str, int], ...]  # (seq_id, position) of each row
    tokens: torch.Tensor  # [rows] int64, on the device; of a multi-step launch [steps, rows]
    logprobs: tuple[torch.Tensor, ...] | None = None  # ``sampler.logprobs`` of one-step rows


def _kept_rows(key: tuple, ahead_key: tuple) -> list[int] | None:
    """The rows of ``ahead_key`` that ``key`` keeps, if ``key`` is ``ahead_key`` less some rows
    (the rest in order), else None; one walk over both."""
    idx: list[int] = []
    i, n = 0, len(ahead_key)
    for k in key:
        while i < n and ahead_key[i] != k:
            i += 1
        if i == n:
            return None
        idx.append(i)
        i += 1
    return idx


class DecodeAhead:
    """One model's step launched ahead (at most one), over its ``DecodeGraphs``; after a
    multi-step launch, also the host copy of its later steps' tokens."""

    def __init__(self, graphs, max_model_len: int, generator: torch.Generator | None = None):
        self.graphs = graphs
        self.max_model_len = max_model_len
        self.generator = generator  # the runner's, for unseeded draws
        self._pending: _Ahead | None = None
        # a multi-step launch's later steps, on the host: per row (seq_id, its ``num_cached``
        # at the first of those steps, its tokens of those steps)
        self._later: list[tuple[str, int, list[int]]] | None = None
        self._later_step = 0
        self._host = None  # pinned int64 [steps * max rows]: this step's tokens, copied before the launch
        self._copied = None
        self.launched = 0  # steps launched ahead (one or several steps each)
        self.taken = 0  # of those, taken by the step they were launched for (the rest dropped)
        self.multi_launched = 0  # of those, multi-step launches
        self.used = 0  # engine steps whose tokens were computed ahead

    def drop(self) -> None:
        self._pending = None
        self._later = None

    def step(self, seqs: Sequence[ScheduledSeq]) -> list[SampledToken] | None:
        """This step's tokens if they were computed ahead: a later step of a multi-step launch
        (already on the host), or the step launched ahead (then the next one is launched before
        waiting); else None, and whatever was computed ahead is dropped."""
        if self._later is not None:
            return self._take_later(seqs)
        taken = self.take(seqs)
        return None if taken is None else self.finish(seqs, *taken)

    def _take_later(self, seqs: Sequence[ScheduledSeq]) -> list[SampledToken] | None:
        later, j = self._later, self._later_step
        if len(seqs) != len(later) or any(
                s.seq_id != seq_id or s.num_cached != pos + j or len(s.token_ids) != 1
                for s, (seq_id, pos, _) in zip(seqs, later, strict=False)):
            # rows dropped (finished, preempted): the rest in order at their positions
            idx = None if any(len(s.token_ids) != 1 for s in seqs) else _kept_rows(
                tuple((s.seq_id, s.num_cached) for s in seqs),
                tuple((seq_id, pos + j) for seq_id, pos, _ in later))
            if idx is None:
                self.drop()  # anything else: both the buffer and the step launched ahead
                return None
            self._later = later = [later[i] for i in idx]
        self._later_step = j + 1
        if j + 1 == len(later[0][2]):
            self._later = None
        self.used += 1
        return [SampledToken(seq_id, toks[j]) for seq_id, _, toks in later]

    def take(self, seqs: Sequence[ScheduledSeq]
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None] | None:
        """The device tokens (and logprobs) of the step launched ahead if this step is that
        step, or that step less some of its rows (the rest in the same order at the same
        positions): then the kept rows'; else None. It is dropped either way."""
        ahead, self._pending = self._pending, None
        if ahead is None:
            return None
        # the common case, the same rows: one pass, no key built (``can_run_ahead``'s test inlined)
        if len(seqs) == len(ahead.key):
            for s, (seq_id, position) in zip(seqs, ahead.key, strict=True):
                if s.seq_id != seq_id or s.num_cached != position or len(s.token_ids) != 1 \
                        or not s.sample:
                    break
            else:
                self.used += 1
                self.taken += 1
                return ahead.tokens, ahead.logprobs
        if not can_run_ahead(seqs) or any(len(s.token_ids) != 1 for s in seqs):
            return None
        key = tuple((s.seq_id, s.num_cached) for s in seqs)
        idx = _kept_rows(key, ahead.key)
        if idx is None:
            return None
        self.used += 1
        self.taken += 1
        index = device_index(idx, ahead.tokens.device)
        return ahead.tokens[..., index], (
            None if ahead.logprobs is None else tuple(t[index] for t in ahead.logprobs))

    def finish(self, seqs: Sequence[ScheduledSeq], tokens: torch.Tensor,
               lps: tuple[torch.Tensor, ...] | None = None) -> list[SampledToken]:
        """Return this step's ``tokens`` (device, one per sequence; ``[steps, rows]`` from a
        multi-step launch, whose later steps ``step`` then hands out) and their logprobs
        (``sampler.logprobs``) as SampledTokens; before waiting for them, launch the next step
        ahead when it is worth it."""
        n = len(seqs)
        steps = tokens.shape[0] if tokens.dim() == 2 else 1
        if tokens.is_cuda:
            if self._host is None:
                self._host = torch.empty(self.graphs.steps * self.graphs.max_batch,
                                         dtype=torch.int64, pin_memory=True)
                self._copied = torch.cuda.Event()
            host = self._host[:steps * n].view(tokens.shape)
            host.copy_(tokens, non_blocking=True)
            if lps is not None:
                lps = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
                    t, non_blocking=True) for t in lps)
            self._copied.record()
        self._launch(seqs, tokens, steps)
        if tokens.is_cuda:
            self._copied.synchronize()  # the copies only: the step launched ahead keeps running
            ids = host.tolist()
        else:
            ids = tokens.tolist()
        if steps == 1:
            return sampled_tokens(seqs, ids, None if lps is None else [t.tolist() for t in lps])
        self._later = [(s.seq_id, s.num_cached + 1, [ids[k][i] for k in range(1, steps)])
                       for i, s in enumerate(seqs)]
        self._later_step = 0
        return [SampledToken(s.seq_id, t) for s, t in zip(seqs, ids[0], strict=True)]

    def _launch(self, seqs: Sequence[ScheduledSeq], tokens: torch.Tensor, steps: int) -> None:
        """Launch the step after the ``steps`` known tokens of ``seqs``: S decode steps in one
        replay when every row is greedy without penalties and the graphs have them
        (``DecodeGraphs.steps``, whose argmax sees no penalties), else one."""
        T = self.graphs.tokens_per_block
        max_len = self.max_model_len
        rows = []  # one row per sequence at the position of its last known token
        key = []
        longest = 0  # the most tokens a row may still need past the known ones
        greedy_only = True  # ... and no penalties or logprobs: multi-step graphs only argmax
        penalised = False
        for s in seqs:
            nxt = s.num_cached + len(s.token_ids) + steps - 1
            table = s.block_table
            if nxt >= len(table) * T or nxt >= max_len:
                return  # no slot for its next token (none at max_model_len or past it)
            left = min(s.params.max_tokens - s.num_generated - steps, max_len - 1 - nxt)
            longest = max(longest, left)
            greedy_only = greedy_only and s.params.temperature == 0.0 \
                and s.params.logprobs is None
            penalised = penalised or len(s.history) > 0
            rows.append((0, nxt, table))
            key.append((s.seq_id, nxt))
        if longest <= 0 or not self.graphs.fits(rows):
            return  # every row finishes by then for sure: the replay would be wasted
        last = tokens[steps - 1] if tokens.dim() == 2 else tokens
        # several steps only when some row needs them all (a reply's last tokens take one
        # step a replay, so its end does not wait for steps past it)
        if greedy_only and not penalised and longest >= self.graphs.steps \
                and self.graphs.fits_steps(rows):
            self._pending = _Ahead(tuple(key), self.graphs.replay_steps(rows, last[:len(seqs)]))
            self.multi_launched += 1
        else:
            logits, greedy = self.graphs.replay(rows, input_ids=last[:len(seqs)])
            # the sequences ``steps`` tokens further: a seeded draw is keyed by its token index,
            # the penalties count the known tokens the host has not applied yet
            known = None
            if penalised:
                known = (tokens.T if tokens.dim() == 2 else tokens[:, None])[:len(seqs)]
            chosen = choose(logits, seqs, self.generator, ahead=steps, greedy=greedy,
                            pending=known)
            self._pending = _Ahead(tuple(key), chosen, logprobs(logits, chosen, seqs))
        self.launched += 1
