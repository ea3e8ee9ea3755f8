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
from dataclasses import dataclass

import torch

from modelhive.engine.kv_pool import BlockAllocator, KVLayout, KVPool
from modelhive.engine.output import CompletionDelta, Detokenizer, TokenLogprob, check_stop_token
from modelhive.engine.scheduler import ModelLimits, Scheduler
from modelhive.engine.sequence import SampledToken, SeqStatus, Sequence, StepResult
from modelhive.errors import CapacityError, InvalidRequestError, ModelNotFoundError
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
    detoks: list[Detokenizer]
    arrival_time: float
    first_token_time: float | None = None


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
        self._seqs: dict[str, Sequence] = {}
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
        seqs, detoks = [], []
        for i in range(params.n):
            seq = Sequence(seq_id=f"{request_id}#{i}", request_id=request_id, index=i, model=model,
                           prompt_token_ids=ids, params=params, arrival=next(self._arrivals),
                           priority=prio)
            seqs.append(seq)
            detoks.append(Detokenizer(params.stop, params.include_stop_str_in_output))
            self._seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        self.prompt_tokens_total[model] += len(ids)
        self._requests[request_id] = _Request(request_id, model, seqs, detoks, time.monotonic())
        return request_id

    def abort(self, request_id: str) -> list[CompletionDelta]:
        req = self._requests.get(request_id)
        if req is None:
            return []
        deltas = []
        for seq, detok in zip(req.seqs, req.detoks, strict=True):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                deltas.append(self._delta(req, seq, detok, (), "", None))
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
        tokens: list[SampledToken] = []
        failed: list[tuple[str, str]] = []
        for batch in plan.batches:
            m = self.models[batch.model]
            try:
                tokens.extend(m.runner.execute(batch))
                m.consecutive_failures = 0
            except Exception as exc:  # one model failing must not take the others down
                log.exception("model %s failed in forward", batch.model)
                failed.append((batch.model, f"{type(exc).__name__}: {exc}"))
                m.consecutive_failures += 1
                if m.consecutive_failures >= 3:
                    m.healthy = False
        self.scheduler.after_step(plan)
        self.num_steps += 1
        return self._apply(StepResult(tuple(tokens), tuple(failed)), plan)

    def _apply(self, result: StepResult, plan) -> list[CompletionDelta]:
        deltas: list[CompletionDelta] = []
        failed_models = dict(result.failed_models)
        for batch in plan.batches:
            if batch.model in failed_models:
                for item in batch.seqs:
                    seq = self._seqs.get(item.seq_id)
                    if seq is not None and not seq.is_finished:
                        self.scheduler.finish(seq, "error")
                        req = self._requests[seq.request_id]
                        deltas.append(self._delta(req, seq, req.detoks[seq.index], (), "", None,
                                                  error=failed_models[batch.model]))
                        self._forget_if_done(req)
        now = time.monotonic()
        for tok in result.tokens:
            seq = self._seqs.get(tok.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue
            req = self._requests[seq.request_id]
            req.first_token_time = req.first_token_time or now
            deltas.append(self._append_token(req, seq, tok))
        return deltas

    def _append_token(self, req: _Request, seq: Sequence, tok: SampledToken) -> CompletionDelta:
        m = self.models[seq.model]
        seq.output_token_ids.append(tok.token_id)
        self.generation_tokens_total[seq.model] += 1
        reason = check_stop_token(seq, tok.token_id, m.tokenizer.eos_token_ids, m.limits.max_model_len)
        detok = req.detoks[seq.index]
        out_ids = seq.output_token_ids
        if reason == "stop" and not seq.params.include_stop_str_in_output:
            out_ids = out_ids[:-1]  # the stop/eos token is in token_ids, not in the text
        text = detok.advance(m.tokenizer.decode, seq.params.skip_special_tokens, out_ids,
                             finished=reason is not None)
        new_text, hit_stop = detok.update(text, finished=reason is not None)
        if hit_stop:
            reason = "stop"
        logprobs = None
        if tok.logprob is not None:
            tk = m.tokenizer
            top = tuple((i, tk.id_to_token(i), lp) for i, lp in (tok.top_logprobs or ()))
            logprobs = (TokenLogprob(tok.token_id, tk.id_to_token(tok.token_id), tok.logprob, top),)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        delta = self._delta(req, seq, detok, (tok.token_id,), new_text, reason, logprobs)
        if reason is not None:  # else this sequence runs on, so its request stays
            self._forget_if_done(req)
        return delta

    def _delta(self, req: _Request, seq: Sequence, detok: Detokenizer, token_ids, text, reason,
               logprobs=None, error: str | None = None) -> CompletionDelta:
        return CompletionDelta(req.request_id, seq.index, tuple(token_ids), text,
                               reason if reason is not None else seq.finish_reason, logprobs,
                               len(seq.prompt_token_ids), len(seq.output_token_ids), error)

    def _forget_if_done(self, req: _Request) -> None:
        if all(s.is_finished for s in req.seqs):
            self._requests.pop(req.request_id, None)
            for s in req.seqs:
                self._seqs.pop(s.seq_id, None)

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
