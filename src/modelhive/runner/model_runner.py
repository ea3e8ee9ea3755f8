"""ModelRunner: one model's ``ModelBatch`` -> tensors + attention metadata -> forward -> sampled tokens.

The only part of the engine that touches tensors. It owns the model and its per-layer views of
the shared pool; it never allocates KV itself (the scheduler's block tables say where to write).
On CUDA, once ``enable_cuda_graphs`` ran, every step of at most ``graph_max_rows`` tokens (decodes,
short prompt chunks, or both) replays one captured graph, one row per token
(``runner/cuda_graphs.py``); longer steps, up to the token budget, replay one prefill graph
(``runner/prefill_graphs.py``); without graphs they run eagerly, their inputs staged in one
copy. Graph steps whose draws the device can make alone launch the next decode before returning
(``runner/decode_ahead.py``).
"""

from __future__ import annotations

import torch

from modelhive.engine.kv_pool import KVLayout
from modelhive.engine.sampler import choose, sample
from modelhive.engine.sequence import ModelBatch, SampledToken
from modelhive.models.base import CausalLM, KVCaches
from modelhive.models.layers import pack_linears_for_cpu
from modelhive.runner.attn_metadata import SeqChunk, build_attention_metadata
from modelhive.runner.cuda_graphs import token_rows
from modelhive.runner.decode_ahead import DecodeAhead, can_run_ahead, device_index


class ModelRunner:
    def __init__(self, name: str, model: CausalLM, layout: KVLayout, kv_caches: KVCaches,
                 device: torch.device):
        self.name = name
        self.model = model
        self.layout = layout
        self.kv_caches = kv_caches
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.seed()
        self.decode_graphs = None  # runner.cuda_graphs.DecodeGraphs once captured
        self.prefill_graphs = None  # runner.prefill_graphs.PrefillGraphs once captured
        self.ahead = None  # runner.decode_ahead.DecodeAhead over those graphs
        if device.type == "cpu":  # bf16/fp16 linears on oneDNN-packed weights (reference.py)
            pack_linears_for_cpu(model)

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

    @torch.inference_mode()
    def execute(self, batch: ModelBatch) -> list[SampledToken]:
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
                    return ahead.finish(batch.seqs, choose(logits, list(batch.seqs),
                                                           self.generator, greedy=greedy))
                return self._sample_rows(logits, last, batch)
        chunks = [SeqChunk(s.num_cached, len(s.token_ids), s.block_table) for s in batch.seqs]
        flat = [t for s in batch.seqs for t in s.token_ids]
        prefill = self.prefill_graphs
        if prefill is not None and prefill.fits(chunks, len(flat)):
            rows = [i for i, s in enumerate(batch.seqs) if s.sample]
            hidden = prefill.replay(chunks, flat, rows)
            if not rows:
                return []
            return sample(self.model.compute_logits(hidden), [batch.seqs[i] for i in rows],
                          self.generator)
        if self.device.type == "cuda":
            from modelhive.runner.cuda_graphs import stage_eager_inputs

            meta, input_ids = stage_eager_inputs(chunks, flat, self.layout.tokens_per_block,
                                                 self.device)
        else:
            meta = build_attention_metadata(chunks, self.layout.tokens_per_block, self.device)
            input_ids = torch.tensor(flat, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, meta, self.kv_caches)
        rows = [i for i, s in enumerate(batch.seqs) if s.sample]
        if not rows:
            return []
        last = meta.logits_indices()[device_index(rows, self.device)]
        logits = self.model.compute_logits(hidden[last])
        return sample(logits, [batch.seqs[i] for i in rows], self.generator)

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
