"""Qwen2 / Qwen2.5: the Llama structure with a bias on q, k and v (not on o) and optionally tied
embeddings (the small Qwen2.5 models tie ``lm_head`` to ``embed_tokens``).

Both differences are read from the ``ArchConfig`` by the Llama classes: ``attention_bias`` gives
``qkv_proj`` its bias (loaded from ``q_proj.bias``, ``k_proj.bias``, ``v_proj.bias``), and
``tie_word_embeddings`` makes ``compute_logits`` use the embedding matrix. Qwen2's per-layer
sliding window (``use_sliding_window``) is refused by ``ArchConfig.from_hf_config``.
"""

from __future__ import annotations

import torch

from modelhive.errors import ConfigError
from modelhive.models.arch import ArchConfig
from modelhive.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device | str = "cpu"):
        if not arch.attention_bias:
            raise ConfigError("Qwen2 has a q/k/v bias; this config says attention_bias=false")
        super().__init__(arch, dtype, device)
