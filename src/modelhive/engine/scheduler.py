"""Scheduler: per step, which models run, which sequences, how many tokens (pure Python).

Per model: continuous batching with chunked prefill (running decodes first, then unfinished
prefills, then admissions from the waiting queue in arrival order), at most ``max_num_seqs``
running. Every model with work is scheduled every step; the step's token budget is split between
models by weighted max-min fairness (``fair_share.py``), and decodes always run.

When the pool cannot give a running sequence the block it needs, the scheduler preempts (by
recompute) the worst running sequence of ANY model: lowest priority first, then latest arrival,
skipping models at or below their guaranteed minimum (their blocks are theirs). Sequences
reserve in the reverse order (the model holding the most urgent one first, most urgent first
inside a model), so the most urgent sequence is never preempted for a less urgent one and the
step always makes progress (no preemption cycles). A preempted
sequence frees its blocks and goes back to the front of its model's waiting queue with
``num_computed = 0``; it later re-prefills prompt + generated tokens and continues.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from dataclasses import dataclass

from modelhive.engine.fair_share import fair_allowances
from modelhive.engine.kv_pool import BlockAllocator, KVLayout
from modelhive.engine.sequence import ModelBatch, ScheduledSeq, SeqStatus, Sequence, StepPlan


@dataclass(frozen=True)
class ModelLimits:
    layout: KVLayout
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


def _urgency(seq: Sequence) -> tuple[float, float]:
    """Sort key, most urgent first: higher priority, then earlier arrival (``_pick_victim``
    preempts in the reverse order)."""
    return (-seq.priority, seq.arrival)


class ModelQueues:
    """One model's waiting queue and running set."""

    def __init__(self, limits: ModelLimits):
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        #: most urgent first (``_urgency``), so a step need not sort it (sequences enter through
        #: ``bisect.insort``; removals keep the order)
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, limits: dict[str, ModelLimits],
                 weights: dict[str, float] | None = None, step_token_budget: int | None = None):
        self.allocator = allocator
        self.queues = {name: ModelQueues(lim) for name, lim in limits.items()}
        self.weights = {name: (weights or {}).get(name, 1.0) for name in limits}
        #: tokens of all models together per step (default: the largest per-model budget, so a
        #: model alone runs at its full budget)
        self.step_token_budget = step_token_budget or max(
            lim.max_num_batched_tokens for lim in limits.values())
        self.num_preemptions: dict[str, int] = {name: 0 for name in limits}
        #: KV slots a decode reserves past its own token: 1 when runners launch the next decode
        #: step ahead (``runner/decode_ahead.py``), whose token needs a slot before the host
        #: has seen this step's token
        self.lookahead = 0

    # --------------------------------------------------------------------------- requests
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.queues[seq.model].waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished (stop, length, abort, error) and return its blocks to the pool."""
        q = self.queues[seq.model]
        if seq.status is SeqStatus.RUNNING:
            q.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            q.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def num_running(self, model: str) -> int:
        return len(self.queues[model].running)

    def num_waiting(self, model: str) -> int:
        return len(self.queues[model].waiting)

    @property
    def has_work(self) -> bool:
        return any(q.has_work for q in self.queues.values())

    # ----------------------------------------------------------------------------- blocks
    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.allocator.free(seq.model, seq.block_table)
            seq.clear_blocks()
        seq.num_computed = 0

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        layout = self.queues[seq.model].limits.layout
        return max(0, layout.blocks_for_tokens(num_tokens) - len(seq.block_table))

    def _preempt(self, seq: Sequence) -> None:
        q = self.queues[seq.model]
        q.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        q.waiting.appendleft(seq)
        self.num_preemptions[seq.model] += 1

    def _pick_victim(self, seq: Sequence, scheduled: set[str], capped: bool) -> Sequence:
        """Worst running sequence not yet scheduled this step (``seq`` itself is a candidate)."""
        candidates = [seq]
        for name, q in self.queues.items():
            if capped and name != seq.model:
                continue  # a model at its own cap can only free its own blocks
            floor = self.allocator.quotas[name].min_blocks if name != seq.model else 0
            if self.allocator.num_used_blocks(name) <= floor:
                continue  # a model within its guaranteed minimum keeps its sequences
            # above its minimum, any of its sequences may go: the allocator keeps the minimum
            # reserved for it (blocks freed below it return to that reservation), and each such
            # preemption frees at least one block for others. Protecting a whole sequence that
            # holds more than its model's minimum let two models preempt each other forever.
            candidates.extend(s for s in q.running
                              if s is not seq and s.seq_id not in scheduled and s.block_table)
        return min(candidates, key=lambda s: (s.priority, -s.arrival))

    def _reserve(self, seq: Sequence, num_tokens: int, scheduled: set[str],
                 preempted: list[str]) -> bool:
        """Give ``seq`` blocks for ``num_tokens`` tokens, preempting others if needed.

        Returns False if ``seq`` itself had to be preempted.
        """
        while True:
            need = self._blocks_needed(seq, num_tokens)
            if need == 0:  # most decode steps: the last block has room
                return True
            if self.allocator.can_allocate(seq.model, need):
                seq.block_table.extend(self.allocator.allocate(seq.model, need))
                return True
            victim = self._pick_victim(seq, scheduled, self.allocator.is_capped(seq.model, need))
            self._preempt(victim)
            preempted.append(victim.seq_id)
            if victim is seq:
                return False

    # ----------------------------------------------------------------------------- a step
    def _demand(self, name: str, q: ModelQueues) -> int:
        """Tokens this model could use this step: decodes + pending prefill, capped by its budget.

        Waiting sequences count only as far as the pool can take them now (admissions never
        preempt): a model held at its cap or by a full pool must not claim a share of the step
        that it cannot use while other models wait (the split must stay work conserving).
        """
        need = sum(s.num_tokens - s.num_computed for s in q.running)
        free_slots = q.limits.max_num_seqs - len(q.running)
        room = self.allocator.num_available(name) * q.limits.layout.tokens_per_block
        for seq in itertools.islice(q.waiting, max(0, free_slots)):
            if room <= 0:
                break
            tokens = seq.num_tokens - seq.num_computed
            need += min(tokens, room)
            room -= q.limits.layout.blocks_for_tokens(tokens) * q.limits.layout.tokens_per_block
        return min(need, q.limits.max_num_batched_tokens)

    def schedule(self) -> StepPlan:
        demand = {name: self._demand(name, q) for name, q in self.queues.items() if q.has_work}
        allowance = fair_allowances(demand, self.weights, self.step_token_budget)
        scheduled: set[str] = set()
        preempted: list[str] = []
        # the model holding the most urgent running sequence reserves first, so that sequence
        # can only ever preempt others, never be preempted by one scheduled before it: the most
        # urgent sequence always advances (without this, sequences of different models could
        # preempt each other in a cycle forever in a tight pool)
        order = sorted(demand, key=lambda name: _urgency(self.queues[name].running[0])
                       if self.queues[name].running else (math.inf, math.inf))
        batches_by_model: dict[str, ModelBatch] = {}
        for name in order:
            decodes, prefills = self._schedule_model(self.queues[name], allowance[name],
                                                     scheduled, preempted)
            if decodes or prefills:
                batches_by_model[name] = ModelBatch(name, tuple(decodes + prefills),
                                                    any(p.prompt_targets for p in prefills))
        return StepPlan(tuple(batches_by_model[name] for name in demand if name in batches_by_model),
                        tuple(preempted))

    def _schedule_model(self, q: ModelQueues, allowance: int, scheduled: set[str],
                        preempted: list[str]) -> tuple[list[ScheduledSeq], list[ScheduledSeq]]:
        """Decodes always run (at most max_num_seqs tokens, within the model's own budget);
        prefill chunks and admissions share what is left of ``allowance``."""
        lim = q.limits
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
        # most urgent first (priority, then arrival: the victim order reversed), so a sequence
        # is only ever preempted in favour of a more urgent one. A copy: preemption changes it.
        running = q.running.copy()
        T = lim.layout.tokens_per_block
        lookahead = self.lookahead
        for seq in running:
            out = seq.output_token_ids
            n = len(seq.prompt_token_ids) + len(out)
            start = seq.num_computed
            if n - start == 1 and start > 0 and seq.status is SeqStatus.RUNNING:
                # most decodes: the table already covers the token and the lookahead slot, which
                # is ``_reserve``'s first check, made here without its call and lookups
                # (~0.3 us per sequence per step, bench/host_overhead.py)
                if len(seq.block_table) * T >= n + lookahead \
                        or self._reserve(seq, n + lookahead, scheduled, preempted):
                    # ``_scheduled(seq, 1)`` inlined: its last token (the prompt's if none is
                    # out), sampled; positional, in field order (keywords cost more)
                    decodes.append(ScheduledSeq(
                        seq.seq_id, (out[-1] if out else seq.prompt_token_ids[-1],), start,
                        seq.table_tuple(), True, seq.params, len(out),
                        seq.history() if seq.needs_history else (), n - len(out)))
                    scheduled.add(seq.seq_id)
        budget = min(allowance, lim.max_num_batched_tokens) - len(decodes)
        for seq in running:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING or seq.seq_id in scheduled:
                continue  # preempted earlier in this step, or already decoding
            chunk = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + chunk, scheduled, preempted):
                continue
            prefills.append(self._scheduled(seq, chunk))
            scheduled.add(seq.seq_id)
            budget -= chunk
        # admissions: FCFS, no preemption on their behalf
        while q.waiting and budget > 0 and len(q.running) < lim.max_num_seqs:
            seq = q.waiting[0]
            chunk = min(seq.num_tokens - seq.num_computed, budget)
            need = self._blocks_needed(seq, seq.num_computed + chunk)
            if not self.allocator.can_allocate(seq.model, need):
                break
            q.waiting.popleft()
            seq.block_table.extend(self.allocator.allocate(seq.model, need))
            seq.status = SeqStatus.RUNNING
            bisect.insort(q.running, seq, key=_urgency)
            prefills.append(self._scheduled(seq, chunk))
            scheduled.add(seq.seq_id)
            budget -= chunk
        return decodes, prefills

    @staticmethod
    def _scheduled(seq: Sequence, chunk: int) -> ScheduledSeq:
        start = seq.num_computed
        num_tokens = seq.num_tokens
        reaches_end = start + chunk == num_tokens
        token_ids = (seq.token_at(start),) if chunk == 1 else seq.tokens(start, start + chunk)
        history = seq.history() if seq.needs_history and reaches_end else ()
        n_prompt = len(seq.prompt_token_ids)
        targets = ()  # prompt tokens to score: until the first output token (then all are)
        if seq.params.prompt_logprobs is not None and start + 1 < n_prompt \
                and not seq.output_token_ids:
            targets = seq.tokens(start + 1, min(start + chunk + 1, n_prompt))
        # positional, in field order (one per sequence per step: keywords cost more)
        return ScheduledSeq(seq.seq_id, token_ids, start, seq.table_tuple(), reaches_end,
                            seq.params, len(seq.output_token_ids), history, n_prompt, targets)

    def after_step(self, plan: StepPlan) -> None:
        """Advance ``num_computed`` for every sequence the plan fed (call before appending tokens)."""
        by_id = {s.seq_id: s for q in self.queues.values() for s in q.running}
        for batch in plan.batches:
            for item in batch.seqs:
                seq = by_id.get(item.seq_id)
                if seq is not None:
                    seq.num_computed = item.num_cached + len(item.token_ids)
