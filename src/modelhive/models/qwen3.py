"""Qwen3 (dense): the Llama structure plus qk-norm, an RMSNorm over ``head_dim`` applied to every
query and key head before RoPE. ``head_dim`` is its own config value (128 for every size), so
``heads * head_dim`` may differ from ``hidden_size``; ``ArchConfig.q_size`` carries that.
"""

from __future__ import annotations

import torch

from modelhive.models.arch import ArchConfig
from modelhive.models.layers import RMSNorm, RotaryEmbedding
from modelhive.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen3Attention(LlamaAttention):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__(arch, rotary, dtype)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().split_heads(qkv)
        return self.q_norm(q), self.k_norm(k), v


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
