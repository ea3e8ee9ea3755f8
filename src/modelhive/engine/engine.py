"""Engine: several models, one pool, one step loop (synchronous, single-threaded).

``Engine.step()`` asks the scheduler for a ``StepPlan``, runs each model's batch on its runner,
applies the sampled tokens, detokenizes, checks stop conditions, and returns the step's
``CompletionDelta``s. One model's forward raising fails only that model's in-flight sequences.
``Hive`` (sync API) and ``AsyncEngine`` (the server's client) drive it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch

from modelhive.engine.kv_pool import BlockAllocator, KVLayout, KVPool
from modelhive.engine.output import CompletionDelta, Detokenizer, TokenLogprob
from modelhive.engine.scheduler import ModelLimits, Scheduler
from modelhive.engine.sequence import (
    PromptScores,
    SampledToken,
    SeqStatus,
    Sequence,
    StepResult,
)
from modelhive.errors import CapacityError, InvalidRequestError, ModelhiveError, ModelNotFoundError
from modelhive.models.tokenizer import Tokenizer
from modelhive.planner.memory import MemoryPlan
from modelhive.runner.model_runner import ModelRunner
from modelhive.sampling_params import SamplingParams

log = logging.getLogger("modelhive.engine")


@dataclass
class LoadedModel:
    name: str
    runner: ModelRunner
    tokenizer: Tokenizer
    limits: ModelLimits
    max_queue: int
    weight: float = 1.0
    healthy: bool = True
    consecutive_failures: int = 0


@dataclass
class _Request:
    request_id: str
    model: str
    seqs: list[Sequence]
    arrival_time: float
    first_token_time: float | None = None


@dataclass(slots=True, eq=False)
class _Live:
    """A sequence of a live request, with what applying its tokens needs (fixed at admission)."""

    seq: Sequence
    req: _Request
    detok: Detokenizer
    tokenizer: Tokenizer
    #: ids that end it once ``min_tokens`` are out: the eos ids (unless ignore_eos), stop_token_ids
    stop_ids: frozenset[int]
    min_tokens: int
    #: "length" once this many tokens are out: max_tokens, or what max_model_len leaves the prompt
    max_output: int
    num_prompt_tokens: int
    #: with ``params.prompt_logprobs``: the prompt tokens' logprobs so far (positions 1..),
    #: handed out with the first output token
    prompt_logprobs: list[TokenLogprob] | None = None


def token_logprob(tk: Tokenizer, token_id: int, logprob: float, top) -> TokenLogprob:
    """A token's logprob with its alternatives ``top`` (``(id, logprob)`` pairs), each with its
    text as the API returns it."""
    texts = tk.logprob_texts
    return TokenLogprob(token_id, texts[token_id], logprob,
                        tuple([(i, texts[i], lp) for i, lp in top]))


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of choice ``index`` of a request: with a seed, choice i draws with seed + i
    (as vLLM's parallel sampling does), so the n choices differ and the request stays
    reproducible; choice 0 is the request itself."""
    if params.seed is None or index == 0:
        return params
    seed = params.seed + index
    return replace(params, seed=seed - 2**64 if seed >= 2**64 else seed)


class Engine:
    def __init__(self, plan: MemoryPlan, pool: KVPool, models: dict[str, LoadedModel],
                 max_waiting_total: int = 4096):
        self.plan = plan
        self.pool = pool
        self.models = models
        #: models left out because they failed to load (name -> one-line reason); not served
        self.failed_models: dict[str, str] = {}
        #: waiting sequences of all models together; beyond it: 503 (per model: 429)
        self.max_waiting_total = max_waiting_total
        self.allocator = BlockAllocator(pool.num_blocks, plan.quotas())
        self.scheduler = Scheduler(self.allocator, {m.name: m.limits for m in models.values()},
                                   weights={m.name: m.weight for m in models.values()})
        self._requests: dict[str, _Request] = {}
        self._live: dict[str, _Live] = {}  # seq_id -> its sequence, until its request is done
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self.num_steps = 0
        #: per-model counters since start (Prometheus *_total metrics)
        self.prompt_tokens_total: Counter[str] = Counter()
        self.generation_tokens_total: Counter[str] = Counter()

    # ------------------------------------------------------------------------ requests
    def model(self, name: str) -> LoadedModel:
        if name not in self.models:
            raise ModelNotFoundError(name, list(self.models))
        return self.models[name]

    def tokenize(self, model: str, prompt: str | list[int]) -> list[int]:
        m = self.model(model)
        if isinstance(prompt, str):
            return m.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and 0 <= t < m.runner.model.arch.vocab_size for t in prompt):
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {m.runner.model.arch.vocab_size}) "
                f"(the vocabulary size of {model})",
                param="prompt")
        return list(prompt)

    def add_request(self, model: str, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None, priority: int | None = None) -> str:
        """Queue a request; returns its id. Raises a ``ModelhiveError`` for bad input or full queues."""
        m = self.model(model)
        if not m.healthy:
            raise CapacityError(f"model {model} is unhealthy after repeated failures", status=503)
        ids = self.tokenize(model, prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(ids) >= m.limits.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but {model}'s max_model_len is "
                f"{m.limits.max_model_len}; shorten the prompt", param="prompt")
        if self.scheduler.num_waiting(model) + params.n > m.max_queue:
            raise CapacityError(f"the queue of {model} is full ({m.max_queue} waiting); retry later")
        waiting_total = sum(self.scheduler.num_waiting(name) for name in self.models)
        if waiting_total + params.n > self.max_waiting_total:
            raise CapacityError(f"the server is at capacity ({waiting_total} requests waiting); "
                                "retry later", status=503)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id} is already running", param="request_id")
        prio = self.plan.model(model).priority if priority is None else priority
        seqs: list[Sequence] = []
        req = _Request(request_id, model, seqs, time.monotonic())
        stop_ids = frozenset(params.stop_token_ids) | frozenset(
            () if params.ignore_eos else m.tokenizer.eos_token_ids)
        max_output = min(params.max_tokens, m.limits.max_model_len - len(ids))
        for i in range(params.n):
            seq = Sequence(seq_id=f"{request_id}#{i}", request_id=request_id, index=i, model=model,
                           prompt_token_ids=ids, params=choice_params(params, i),
                           arrival=next(self._arrivals), priority=prio)
            seqs.append(seq)
            detok = Detokenizer(params.stop, params.include_stop_str_in_output)
            self._live[seq.seq_id] = _Live(
                seq, req, detok, m.tokenizer, stop_ids, params.min_tokens, max_output, len(ids),
                None if params.prompt_logprobs is None else [])
            self.scheduler.add(seq)
        self.prompt_tokens_total[model] += len(ids)
        self._requests[request_id] = req
        return request_id

    def abort(self, request_id: str) -> list[CompletionDelta]:
        req = self._requests.get(request_id)
        if req is None:
            return []
        deltas = []
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                deltas.append(self._delta(req, seq, (), "", None))
        self._forget_if_done(req)
        return deltas

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ----------------------------------------------------------------------------- step
    def step(self) -> list[CompletionDelta]:
        plan = self.scheduler.schedule()
        planned = {batch.model for batch in plan.batches}
        for name, m in self.models.items():
            if name not in planned:
                m.runner.skip_step()
        if plan.is_empty:
            return []
        outputs: list[tuple[str, list[SampledToken]]] = []  # (model, its sampled tokens)
        failed: dict[str, str] = {}  # model -> error message, for each model whose forward raised
        scores: list[PromptScores] = []
        for batch in plan.batches:
            m = self.models[batch.model]
            try:
                outputs.append((batch.model, m.runner.execute(batch)))
                if batch.scores_prompt:
                    scores.extend(m.runner.take_prompt_scores())
                m.consecutive_failures = 0
            except Exception as exc:  # one model failing must not take the others down
                log.exception("model %s failed in forward", batch.model)
                failed[batch.model] = f"{type(exc).__name__}: {exc}"
                m.consecutive_failures += 1
                if m.consecutive_failures >= 3:
                    m.healthy = False
        self.scheduler.after_step(plan)
        self.num_steps += 1
        return self._apply(StepResult(tuple(outputs), failed, tuple(scores)), plan)

    def _apply(self, result: StepResult, plan) -> list[CompletionDelta]:
        deltas: list[CompletionDelta] = []
        failed = result.failed_models
        for batch in plan.batches:
            if batch.model in failed:
                for item in batch.seqs:
                    live = self._live.get(item.seq_id)
                    if live is not None and not live.seq.is_finished:
                        self.scheduler.finish(live.seq, "error")
                        deltas.append(self._delta(live.req, live.seq, (), "", None,
                                                  error=failed[batch.model]))
                        self._forget_if_done(live.req)
        for sc in result.prompt_scores:
            live = self._live.get(sc.seq_id)
            if live is not None and live.prompt_logprobs is not None:
                self._add_prompt_scores(live, sc)
        now = time.monotonic()
        running = SeqStatus.RUNNING
        for model, tokens in result.tokens:
            applied = 0
            for tok in tokens:
                live = self._live.get(tok.seq_id)
                if live is None or live.seq.status is not running:
                    continue
                if live.req.first_token_time is None:
                    live.req.first_token_time = now
                deltas.append(self._append_token(live, tok))
                applied += 1
            if applied:
                self.generation_tokens_total[model] += applied
        return deltas

    def _append_token(self, live: _Live, tok: SampledToken) -> CompletionDelta:
        seq = live.seq
        token_id = tok.token_id
        out = seq.output_token_ids
        out.append(token_id)
        n_out = len(out)
        # token-level stop rules: eos / stop_token_ids once min_tokens are out, then max_tokens or
        # max_model_len (prompt + output), both folded into max_output at admission
        if token_id in live.stop_ids and n_out >= live.min_tokens:
            reason = "stop"
        elif n_out >= live.max_output:
            reason = "length"
        else:
            reason = None
        detok = live.detok
        finished = reason is not None
        # the stop/eos token is in token_ids, not in the text
        drop_last = reason == "stop" and not detok.include_stop
        if not drop_last and detok.read_offset == n_out - 1 \
                and (piece := live.tokenizer.appended_text(token_id)) is not None:
            # most tokens: the tokenizer knows the text this one adds, so no decode; and
            # without stop strings, nothing to hold back (``emit`` = ``advance_by`` + ``update``)
            if detok.stop:
                new_text, hit_stop = detok.update(detok.advance_by(piece, n_out), finished)
            else:
                new_text, hit_stop = detok.emit(piece, n_out), False
        else:
            text = detok.advance(live.tokenizer.decode, seq.params.skip_special_tokens,
                                 out[:-1] if drop_last else out, finished,
                                 live.tokenizer.decode_token)
            new_text, hit_stop = detok.update(text, finished)
        if hit_stop:
            reason = "stop"
        logprobs = None
        if tok.logprob is not None:
            logprobs = (token_logprob(live.tokenizer, token_id, tok.logprob,
                                      tok.top_logprobs or ()),)
        # positional, in field order (one per token: keywords cost more)
        delta = CompletionDelta(live.req.request_id, seq.index, (token_id,), new_text, reason,
                                logprobs, live.num_prompt_tokens, n_out, None)
        if n_out == 1 and live.prompt_logprobs is not None:
            delta.prompt_logprobs = tuple(live.prompt_logprobs)
        if reason is not None:  # else this sequence runs on, so its request stays
            self.scheduler.finish(seq, reason)
            self._forget_if_done(live.req)
        return delta

    @staticmethod
    def _add_prompt_scores(live: _Live, sc: PromptScores) -> None:
        """Append the scores of prompt positions not scored yet (a sequence preempted before its
        first token recomputes its prompt, and scores it again)."""
        have = live.prompt_logprobs
        skip = 1 + len(have) - sc.position  # entries of positions already held
        if skip < 0:  # chunks run in order from position 0, so this does not happen
            log.error("prompt scores of %s skip positions %d..%d", live.seq.seq_id,
                      1 + len(have), sc.position - 1)
            return
        have.extend(token_logprob(live.tokenizer, token_id, logprob, top)
                    for token_id, logprob, top in sc.entries[skip:])

    def _delta(self, req: _Request, seq: Sequence, token_ids, text, reason,
               logprobs=None, error: str | None = None) -> CompletionDelta:
        return CompletionDelta(req.request_id, seq.index, tuple(token_ids), text,
                               reason if reason is not None else seq.finish_reason, logprobs,
                               len(seq.prompt_token_ids), len(seq.output_token_ids), error)

    def _forget_if_done(self, req: _Request) -> None:
        if all(s.is_finished for s in req.seqs):
            self._requests.pop(req.request_id, None)
            for s in req.seqs:
                self._live.pop(s.seq_id, None)

    # -------------------------------------------------------------------------- warm-up
    def warm_up(self) -> float:
        """Run a few two-token requests per model through every sampling path (greedy; drawn
        with top-k, top-p, min-p and a seed; penalties; logprobs with prompt logprobs), each
        alone and then all in one batch, so that what the device does first for each kind of
        request happens before serving: CUDA loads a kernel's code on its first launch, which
        made the first request of a kind 3-7x slower than the next on an H200 (and every stream
        in flight waited out that step). Leaves no trace: the counters are reset and every
        block goes back. A request that a model's limits refuse (a tiny ``max_model_len`` or
        ``max_queue``) is left out. Returns the seconds it took."""
        start = time.perf_counter()
        kinds = (
            SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=2, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05,
                           seed=0, ignore_eos=True),
            SamplingParams(max_tokens=2, temperature=1.0, ignore_eos=True),
            SamplingParams(max_tokens=2, temperature=0.0, repetition_penalty=1.1,
                           presence_penalty=0.5, frequency_penalty=0.5, ignore_eos=True),
            SamplingParams(max_tokens=2, temperature=0.7, logprobs=5, prompt_logprobs=5,
                           ignore_eos=True),
        )
        ids = itertools.count()
        for name, m in self.models.items():
            length = min(8, m.limits.max_model_len - 3)  # room for the two tokens
            prompt = [i % m.runner.model.arch.vocab_size for i in range(1, 1 + max(1, length))]
            for batch in [*((params,) for params in kinds), kinds]:  # each alone, then together
                if not m.healthy:  # its forward failed (logged); serving reports it
                    break
                for params in batch:
                    try:
                        self.add_request(name, prompt, params, request_id=f"warm-up-{next(ids)}")
                    except ModelhiveError as exc:
                        log.debug("warm-up of %s: a request left out: %s", name, exc)
                while self.has_work:
                    self.step()
        self.num_steps = 0
        self.prompt_tokens_total.clear()
        self.generation_tokens_total.clear()
        for name in self.scheduler.num_preemptions:
            self.scheduler.num_preemptions[name] = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    # ---------------------------------------------------------------------------- state
    def check_integrity(self) -> None:
        """Allocator invariants, plus: the blocks held by live sequences are exactly the used ones."""
        self.allocator.check_integrity()
        held: dict[str, int] = {name: 0 for name in self.models}
        for q_name, q in self.scheduler.queues.items():
            for s in q.running:
                held[q_name] += len(s.block_table)
            for s in q.waiting:
                assert not s.block_table, f"waiting sequence {s.seq_id} holds blocks"
        for name in self.models:
            assert held[name] == self.allocator.num_used_blocks(name), (
                f"{name}: sequences hold {held[name]} blocks, allocator says "
                f"{self.allocator.num_used_blocks(name)}")

    def kv_layout(self, model: str) -> KVLayout:
        return self.models[model].limits.layout

    @property
    def device(self) -> torch.device:
        return self.pool.storage.device
