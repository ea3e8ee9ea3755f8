"""Sequence state (plain Python) and the two contracts between scheduler and runner.

- ``StepPlan``: what the scheduler decided for one step: per model, which sequences feed which
  tokens and which blocks hold their KV.
- ``SampledToken``: what a runner answers for its model's batch, one per sequence that asked for
  one (a model whose forward raised answers nothing: the engine fails its sequences); beside
  them, ``PromptScores`` for chunks whose prompt logprobs were asked for.
- ``StepResult``: the step's answers, per model, and the models whose forward raised.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from modelhive.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to recompute)
    RUNNING = "running"  # holds blocks; prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion being generated (a request with ``n`` > 1 has n sequences)."""

    seq_id: str
    request_id: str
    index: int  # completion index inside its request
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # monotonic admission counter: lower arrived earlier
    priority: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the pool
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    _table: tuple[int, ...] = field(default=(), init=False, repr=False)
    #: the sampler needs the token history (penalties); fixed, as ``params`` is
    needs_history: bool = field(init=False, repr=False)
    _history: np.ndarray | None = field(default=None, init=False, repr=False)
    _history_len: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        p = self.params
        self.needs_history = (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                              or p.frequency_penalty != 0.0)

    def table_tuple(self) -> tuple[int, ...]:
        """``block_table`` as a tuple: the same object from step to step while the table does not
        change (the graph runner then skips restaging it). Blocks are only ever appended, and a
        cleared table goes through ``clear_blocks``, so a cached tuple of the current length is
        the current table."""
        if len(self._table) != len(self.block_table):
            self._table = tuple(self.block_table)
        return self._table

    def clear_blocks(self) -> None:
        self.block_table = []
        self._table = ()

    def history(self) -> np.ndarray:
        """Prompt + output tokens as an int64 array (a view the next tokens do not change),
        for the sampler's penalties. Kept up to date incrementally: a call copies only the
        tokens added since the last one (the whole history as a tuple each step cost ~20 us a
        sequence at 600 tokens, the scheduler's tuple and the sampler's array together), a
        step's single new token without building a tuple."""
        n_prompt = len(self.prompt_token_ids)
        out = self.output_token_ids
        n = n_prompt + len(out)
        have = self._history_len
        if have < n:
            buf = self._history
            if buf is None or len(buf) < n:
                grown = np.empty(max(n, 2 * (len(buf) if buf is not None else 0), 64),
                                 dtype=np.int64)
                if have:
                    grown[:have] = buf[:have]
                self._history = buf = grown
            if have == n - 1 and have >= n_prompt:  # a step's one new token: no tuple
                buf[have] = out[-1]
            else:
                buf[have:n] = self.tokens(have, n)
            self._history_len = n
        return self._history[:n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, index: int) -> int:
        n_prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n_prompt else self.output_token_ids[index - n_prompt]

    def tokens(self, start: int, end: int) -> tuple[int, ...]:
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return tuple(self.prompt_token_ids[start:end])
        return tuple(self.prompt_token_ids[start:] if start < n_prompt else ()) + tuple(
            self.output_token_ids[max(0, start - n_prompt): end - n_prompt])

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's part of a step (a record: never changed once made; not frozen because a
    frozen dataclass takes ~6x longer to build, and the scheduler builds one per sequence per
    step)."""

    seq_id: str
    token_ids: tuple[int, ...]  # fed this step
    num_cached: int  # tokens already in the pool before this step
    block_table: tuple[int, ...]
    sample: bool  # True when this step reaches the sequence's end: sample its next token
    params: SamplingParams
    num_generated: int  # tokens generated so far (the seeded sampler's step index)
    #: prompt + output tokens so far, only when penalties need them (else empty): an int64
    #: array from the scheduler (``Sequence.history``), any int sequence elsewhere
    history: np.ndarray | tuple[int, ...] = ()
    num_prompt_tokens: int = 0
    #: with ``params.prompt_logprobs``: the prompt tokens this chunk's rows predict (row i
    #: predicts the token at ``num_cached + 1 + i``), while the sequence has no output yet
    prompt_targets: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelBatch:
    model: str
    seqs: tuple[ScheduledSeq, ...]  # decodes first, then prefill/extend chunks
    #: some chunk has ``prompt_targets`` (the runner then runs the step eagerly and scores them)
    scores_prompt: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(frozen=True)
class StepPlan:
    batches: tuple[ModelBatch, ...]
    preempted: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.batches


@dataclass(frozen=True)
class StepResult:
    #: (model, the tokens its runner sampled) for each model whose forward ran
    tokens: tuple[tuple[str, list[SampledToken]], ...]
    #: model -> error message, for each model whose forward raised this step
    failed_models: dict[str, str]
    #: the prompt logprobs the runners computed this step
    prompt_scores: tuple[PromptScores, ...] = ()


@dataclass(slots=True)
class SampledToken:  # a record, not frozen (built per token: see ScheduledSeq)
    seq_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class PromptScores:
    """Logprobs of a run of one sequence's prompt tokens (``ScheduledSeq.prompt_targets``):
    ``entries[i]`` = (token id, its logprob, the top alternatives as (id, logprob)) for the
    prompt token at ``position + i``."""

    seq_id: str
    position: int
    entries: tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...]
