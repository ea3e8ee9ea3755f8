"""ModelRunner: one model's ``ModelBatch`` -> tensors + attention metadata -> forward -> sampled tokens.

The only part of the engine that touches tensors. It owns the model and its per-layer views of
the shared pool; it never allocates KV itself (the scheduler's block tables say where to write).
"""

from __future__ import annotations

import torch

from modelhive.engine.kv_pool import KVLayout
from modelhive.engine.sampler import sample
from modelhive.engine.sequence import ModelBatch, SampledToken
from modelhive.models.base import CausalLM, KVCaches
from modelhive.runner.attn_metadata import SeqChunk, build_attention_metadata


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

    @torch.inference_mode()
    def execute(self, batch: ModelBatch) -> list[SampledToken]:
        chunks = [SeqChunk(s.num_cached, len(s.token_ids), s.block_table) for s in batch.seqs]
        meta = build_attention_metadata(chunks, self.layout.tokens_per_block, self.device)
        flat = [t for s in batch.seqs for t in s.token_ids]
        input_ids = torch.tensor(flat, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, meta, self.kv_caches)
        rows = [i for i, s in enumerate(batch.seqs) if s.sample]
        if not rows:
            return []
        last = meta.logits_indices()[torch.tensor(rows, device=self.device)]
        logits = self.model.compute_logits(hidden[last])
        return sample(logits, [batch.seqs[i] for i in rows], self.generator)
