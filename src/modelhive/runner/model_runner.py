"""ModelRunner: one model's ``ModelBatch`` -> tensors + attention metadata -> forward -> sampled tokens.

The only part of the engine that touches tensors. It owns the model and its per-layer views of
the shared pool; it never allocates KV itself (the scheduler's block tables say where to write).
On CUDA, decode-only steps replay a captured graph once ``enable_cuda_graphs`` ran
(``runner/cuda_graphs.py``), and so do steps whose chunks are all short (one replay per token
position); every other step runs eagerly, its inputs staged in one copy.
"""

from __future__ import annotations

import torch

from modelhive.engine.kv_pool import KVLayout
from modelhive.engine.sampler import sample
from modelhive.engine.sequence import ModelBatch, SampledToken, ScheduledSeq
from modelhive.models.base import CausalLM, KVCaches
from modelhive.runner.attn_metadata import SeqChunk, build_attention_metadata

#: a step whose chunks are all at most this long (short prompts like "Hello", mixed with decodes)
#: runs as that many decode-graph replays, one token of every chunk per replay, instead of one
#: eager forward: an eager step costs ~15 ms of kernel launches on the GPU, a replay ~1-4 ms.
SHORT_CHUNK_REPLAYS = 4


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

    def enable_cuda_graphs(self, max_num_seqs: int, max_model_len: int, pool=None) -> None:
        """Capture decode graphs for batch buckets up to ``max_num_seqs`` (CUDA only); ``pool``:
        a CUDA graph memory pool shared with the other models of the engine."""
        from modelhive.runner.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(self.model, self.kv_caches, self.layout.tokens_per_block,
                              max_num_seqs, max_model_len, self.device, pool=pool)
        graphs.capture()
        self.decode_graphs = graphs

    @torch.inference_mode()
    def execute(self, batch: ModelBatch) -> list[SampledToken]:
        if self.decode_graphs is not None:
            logits = self.decode_graphs.run(batch.seqs)
            if logits is not None:  # decode-only: every sequence samples
                return sample(logits, list(batch.seqs), self.generator)
            longest = max(len(s.token_ids) for s in batch.seqs)
            if longest <= SHORT_CHUNK_REPLAYS and self.decode_graphs.fits(batch.seqs):
                return self._execute_by_replays(batch)
        chunks = [SeqChunk(s.num_cached, len(s.token_ids), s.block_table) for s in batch.seqs]
        flat = [t for s in batch.seqs for t in s.token_ids]
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
        last = meta.logits_indices()[torch.tensor(rows, device=self.device)]
        logits = self.model.compute_logits(hidden[last])
        return sample(logits, [batch.seqs[i] for i in rows], self.generator)

    def _execute_by_replays(self, batch: ModelBatch) -> list[SampledToken]:
        """Feed token j of every chunk in replay j (KV of earlier tokens is in the pool by then);
        keep the logits row of each sequence's last token. Same results as one eager forward
        (each token attends to exactly the same keys)."""
        seqs = batch.seqs
        rows: dict[int, torch.Tensor] = {}
        for j in range(max(len(s.token_ids) for s in seqs)):
            part = [i for i, s in enumerate(seqs) if j < len(s.token_ids)]
            step = [ScheduledSeq(seqs[i].seq_id, (seqs[i].token_ids[j],), seqs[i].num_cached + j,
                                 seqs[i].block_table, True, seqs[i].params,
                                 seqs[i].num_generated) for i in part]
            logits = self.decode_graphs.replay_one_token_each(step)
            for row, i in enumerate(part):
                if j == len(seqs[i].token_ids) - 1 and seqs[i].sample:
                    rows[i] = logits[row].clone()  # static graph output: copy before next replay
        if not rows:
            return []
        order = sorted(rows)
        return sample(torch.stack([rows[i] for i in order]), [seqs[i] for i in order],
                      self.generator)
