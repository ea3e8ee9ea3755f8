"""ModelRunner: one model's ``ModelBatch`` -> tensors + attention metadata -> forward -> sampled tokens.

The only part of the engine that touches tensors. It owns the model and its per-layer views of
the shared pool; it never allocates KV itself (the scheduler's block tables say where to write).
On CUDA, once ``enable_cuda_graphs`` ran, every step of at most ``graph_max_rows`` tokens (decodes,
short prompt chunks, or both) replays one captured graph, one row per token
(``runner/cuda_graphs.py``); longer steps, up to the token budget, replay one prefill graph
(``runner/prefill_graphs.py``); without graphs they run eagerly, their inputs staged in one
copy. Graph steps whose draws the device can make alone launch the next decode before returning
(``runner/decode_ahead.py``).

Steps that score prompt tokens (``ModelBatch.scores_prompt``: prompt logprobs were asked for) run
eagerly, since the graphs keep only the sampled rows' hidden states: the logits of the scored rows
are computed ``score_rows`` rows at a time (the model's ``max_num_seqs``, so within the plan's
logits phase) and returned by ``take_prompt_scores``.
"""

from __future__ import annotations

import logging

import torch

from modelhive.engine.kv_pool import KVLayout
from modelhive.engine.sampler import choose, device_index, logprobs, sample, token_logprobs
from modelhive.engine.sequence import ModelBatch, PromptScores, SampledToken, ScheduledSeq
from modelhive.kernels import reference
from modelhive.models.base import CausalLM, KVCaches
from modelhive.models.layers import pack_linears_for_cpu
from modelhive.runner.attn_metadata import SeqChunk, build_attention_metadata
from modelhive.runner.cuda_graphs import token_rows
from modelhive.runner.decode_ahead import DecodeAhead, can_run_ahead

log = logging.getLogger("modelhive.runner")


class ModelRunner:
    def __init__(self, name: str, model: CausalLM, layout: KVLayout, kv_caches: KVCaches,
                 device: torch.device, score_rows: int = 32):
        self.name = name
        self.model = model
        self.layout = layout
        self.kv_caches = kv_caches
        self.device = device
        self.generator = torch.Generator()  # the sampler's unseeded uniforms, made on the host
        self.generator.seed()
        self.decode_graphs = None  # runner.cuda_graphs.DecodeGraphs once captured
        self.prefill_graphs = None  # runner.prefill_graphs.PrefillGraphs once captured
        self.ahead = None  # runner.decode_ahead.DecodeAhead over those graphs
        self.score_rows = max(1, score_rows)
        self._prompt_scores: list[PromptScores] = []
        if device.type == "cpu":  # bf16/fp16 linears on oneDNN-packed weights (reference.py)
            pack_linears_for_cpu(model)
            dtype = next(model.parameters()).dtype
            if dtype in reference.PACKED_DTYPES and not reference.cpu_packs(dtype):
                log.warning("model %s: this CPU's oneDNN cannot pack %s weights (it needs "
                            "AVX-512 or AVX-NE-CONVERT): its linears run unpacked, slower than "
                            "float32 (dtype auto) on such a CPU", name, str(dtype).split(".")[-1])

    def enable_cuda_graphs(self, max_num_seqs: int, max_model_len: int, pool=None,
                           max_num_batched_tokens: int = 0, decode_steps: int = 1) -> None:
        """Capture decode graphs for batch buckets up to ``max_num_seqs``, and prefill graphs
        for longer steps up to ``max_num_batched_tokens`` tokens (CUDA only); ``pool``: a CUDA
        graph memory pool shared with the other models of the engine; ``decode_steps`` > 1:
        each bucket also gets a graph of that many greedy decode steps in a row."""
        from modelhive.planner.estimates import prefill_graph_sizes
        from modelhive.runner.cuda_graphs import DecodeGraphs
        from modelhive.runner.prefill_graphs import PrefillGraphs

        T = self.layout.tokens_per_block
        graphs = DecodeGraphs(self.model, self.kv_caches, T, max_num_seqs, max_model_len,
                              self.device, pool=pool, steps=decode_steps)
        graphs.capture()
        self.decode_graphs = graphs
        self.ahead = DecodeAhead(graphs, max_model_len, self.generator)
        sizes = prefill_graph_sizes(max_num_seqs, max_num_batched_tokens)
        if sizes:  # else every step fits the decode graphs
            prefill = PrefillGraphs(self.model, self.kv_caches, T, max_num_seqs, max_model_len,
                                    sizes, self.device, pool=graphs.pool)
            prefill.capture()
            self.prefill_graphs = prefill

    def skip_step(self) -> None:
        """This model has no batch in this step: a step launched ahead is stale."""
        if self.ahead is not None:
            self.ahead.drop()

    def take_prompt_scores(self) -> list[PromptScores]:
        """The prompt logprobs of the last ``execute`` (then forgotten)."""
        scores, self._prompt_scores = self._prompt_scores, []
        return scores

    @torch.inference_mode()
    def execute(self, batch: ModelBatch) -> list[SampledToken]:
        if batch.scores_prompt:
            return self._execute_scoring(batch)
        if self.decode_graphs is not None:
            ahead = self.ahead
            if ahead is not None and (out := ahead.step(batch.seqs)) is not None:
                return out  # this step was launched ahead
            # a step of more tokens than the largest decode graph skips building its rows (1.4
            # ms for an 8,192-token prompt step on the CPU, while the GPU waits)
            small = sum(len(s.token_ids) for s in batch.seqs) <= self.decode_graphs.max_batch
            rows, last = token_rows(batch.seqs) if small else ([], [])
            if small and self.decode_graphs.fits(rows):  # one replay (eager: ~15 ms of launches)
                logits, greedy = self.decode_graphs.replay(rows)
                if ahead is not None and can_run_ahead(batch.seqs):
                    if len(last) == 1 and len(rows) > 1:  # one prompt chunk: its last row
                        logits, greedy = logits[last[0]:], greedy[last[0]:]
                    elif len(rows) > len(last):  # prompt chunks: each sequence's last row
                        index = device_index(last, self.device)
                        logits, greedy = logits[index], greedy[index]
                    tokens = choose(logits, batch.seqs, self.generator, greedy=greedy)
                    return ahead.finish(batch.seqs, tokens, logprobs(logits, tokens, batch.seqs))
                return self._sample_rows(logits, last, batch)
        chunks, flat = step_chunks(batch.seqs)
        prefill = self.prefill_graphs
        if prefill is not None and prefill.fits(chunks, len(flat)):
            rows = [i for i, s in enumerate(batch.seqs) if s.sample]
            hidden = prefill.replay(chunks, flat, rows)
            if not rows:
                return []
            return sample(self.model.compute_logits(hidden), [batch.seqs[i] for i in rows],
                          self.generator)
        return self._execute_eager(batch, chunks, flat)

    def _execute_scoring(self, batch: ModelBatch) -> list[SampledToken]:
        """An eager step that also scores the chunks' ``prompt_targets``."""
        if self.ahead is not None:
            self.ahead.drop()  # a decode launched ahead does not match this step
        return self._execute_eager(batch, *step_chunks(batch.seqs))

    def _execute_eager(self, batch: ModelBatch, chunks: list[SeqChunk],
                       flat: list[int]) -> list[SampledToken]:
        if self.device.type == "cuda":
            from modelhive.runner.cuda_graphs import stage_eager_inputs

            meta, input_ids = stage_eager_inputs(chunks, flat, self.layout.tokens_per_block,
                                                 self.device)
        else:
            meta = build_attention_metadata(chunks, self.layout.tokens_per_block, self.device)
            input_ids = torch.tensor(flat, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, meta, self.kv_caches)
        if batch.scores_prompt:
            self._score_prompts(hidden, batch.seqs)
        rows = [i for i, s in enumerate(batch.seqs) if s.sample]
        if not rows:
            return []
        last = meta.logits_indices()[device_index(rows, self.device)]
        logits = self.model.compute_logits(hidden[last])
        return sample(logits, [batch.seqs[i] for i in rows], self.generator)

    def _score_prompts(self, hidden: torch.Tensor, seqs: tuple[ScheduledSeq, ...]) -> None:
        """Logprobs of each chunk's ``prompt_targets`` from the rows before them (row i of a
        chunk predicts its token i + 1), raw (log_softmax of the model's logits), with the
        top ``params.prompt_logprobs`` alternatives."""
        start = 0
        for s in seqs:
            targets = s.prompt_targets
            if targets:
                entries = []
                k = s.params.prompt_logprobs or 0
                for lo in range(0, len(targets), self.score_rows):
                    part = targets[lo:lo + self.score_rows]
                    logits = self.model.compute_logits(hidden[start + lo:start + lo + len(part)])
                    ids = torch.tensor(part, dtype=torch.long, device=logits.device)
                    chosen, *top = token_logprobs(logits, ids, k)
                    chosen = chosen.tolist()
                    if k:
                        vals, top_ids = top
                        tops = [tuple(zip(i, v, strict=True))
                                for i, v in zip(top_ids.tolist(), vals.tolist(), strict=True)]
                    else:
                        tops = [()] * len(part)
                    entries.extend(zip(part, chosen, tops, strict=True))
                self._prompt_scores.append(PromptScores(s.seq_id, s.num_cached + 1,
                                                        tuple(entries)))
            start += len(s.token_ids)

    def _sample_rows(self, logits: torch.Tensor, last: list[int],
                     batch: ModelBatch) -> list[SampledToken]:
        """Sample the sequences that reach their end from the logits row of their last token."""
        picked = [(i, last[i]) for i, s in enumerate(batch.seqs) if s.sample]
        if not picked:
            return []
        if len(picked) < logits.shape[0]:
            index = device_index([r for _, r in picked], self.device)
            logits = logits[index]
        return sample(logits, [batch.seqs[i] for i, _ in picked], self.generator)


def step_chunks(seqs: tuple[ScheduledSeq, ...]) -> tuple[list[SeqChunk], list[int]]:
    """A step's chunks (what the attention metadata is built from) and its token ids in order."""
    return ([SeqChunk(s.num_cached, len(s.token_ids), s.block_table) for s in seqs],
            [t for s in seqs for t in s.token_ids])
