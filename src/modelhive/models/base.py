"""The contract every architecture file implements.

A model is an ``nn.Module`` built from an ``ArchConfig`` that:
- ``forward(input_ids [N], meta, kv_caches) -> hidden [N, hidden_size]``: runs all layers on the
  step's flat tokens; positions come from ``meta.positions``; each layer writes its new K/V into
  ``kv_caches[layer] = (k_view, v_view)`` (pool views, see ``engine/kv_pool.py``) and attends
  through ``kernels.ops.paged_attention``.
- ``compute_logits(hidden [M, hidden_size]) -> [M, vocab]``: final projection (+ softcap), float32
  or, on CUDA above the GEMV's rows without softcap, the model dtype (``ops.logits``).
- ``load_weights(weights)``: takes ``(hf_name, tensor)`` pairs with transformers' checkpoint names
  and copies them into its (fused) parameters; q/k/v pack into ``qkv_proj`` and gate/up into
  ``gate_up_proj``. Returns the set of parameter names it filled, so the loader can check that
  nothing is missing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from modelhive.models.arch import ArchConfig
from modelhive.runner.attn_metadata import AttentionMetadata

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


class CausalLM(nn.Module):
    arch: ArchConfig

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: KVCaches) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        raise NotImplementedError
