"""Llama family: Llama 2/3, TinyLlama, Yi, SmolLM2, Mistral (without sliding window).

Pre-norm decoder written on the residual stream ``h``: ``h += attn(norm(h)); h += mlp(norm(h))``.
Each norm is fused into the linear after it (``RMSNorm.then`` / ``then_act``) and each add into
the linear before it (``ops.linear_add``), so a layer is six ops: qkv (+norm), RoPE + store-KV,
attention, o_proj (+add), gate_up (+norm, +SiLU-and-mul), down (+add).
GQA attention with RoPE; SwiGLU MLP.
Qwen2 (qkv bias, set by ``arch.attention_bias``) and Qwen3 (qk-norm) reuse these classes; the
class attributes ``attention_cls`` / ``layer_cls`` / ``model_cls`` and ``split_heads`` are the
only hooks.

Shapes: all tokens of a step are flat, ``[N, hidden]``; heads are ``[N, heads, head_dim]``.
"""

from __future__ import annotations

import torch
from torch import nn

from modelhive.kernels import ops
from modelhive.models.arch import ArchConfig
from modelhive.models.base import KVCaches
from modelhive.models.layers import (
    DecoderLM,
    Embedding,
    GatedMLP,
    Linear,
    PagedAttention,
    QKVLinear,
    RMSNorm,
    RotaryEmbedding,
)
from modelhive.runner.attn_metadata import AttentionMetadata


class LlamaAttention(nn.Module):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            arch.num_heads, arch.num_kv_heads, arch.head_dim)
        self.qkv_proj = QKVLinear(arch.hidden_size, arch.num_heads, arch.num_kv_heads,
                                  arch.head_dim, arch.attention_bias, dtype)
        self.o_proj = Linear(arch.q_size, arch.hidden_size, False, dtype)
        self.rotary = rotary
        self.attn = PagedAttention(scale=arch.head_dim ** -0.5)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``qkv_proj`` output -> q ``[N, heads, D]``, k and v ``[N, kv_heads, D]`` (before RoPE)."""
        q, k, v = qkv.split(self.qkv_proj.sizes, dim=-1)
        return (q.view(-1, self.num_heads, self.head_dim),
                k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim))

    def add_to(self, h: torch.Tensor, norm: RMSNorm, meta: AttentionMetadata,
               kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``h + o_proj(attention(norm(h)))``."""
        q, k, v = self.split_heads(norm.then(self.qkv_proj, h))
        q = self.rotary.rotate_and_store(q, k, v, kv_cache, meta)
        out = self.attn.attend(q, kv_cache, meta)
        return ops.linear_add(out.flatten(1), self.o_proj.weight, h)


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.self_attn = self.attention_cls(arch, rotary, dtype)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, arch.hidden_act, dtype)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = self.self_attn.add_to(h, self.input_layernorm, meta, kv_cache)
        return self.mlp.add_to(h, self.post_attention_layernorm)


class LlamaModel(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, arch: ArchConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.rope_theta,
                                          dict(arch.rope_scaling) or None)
        self.layers = nn.ModuleList(
            [self.layer_cls(arch, self.rotary_emb, dtype) for _ in range(arch.num_layers)])
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_caches: KVCaches) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h = layer(h, meta, kv_cache)
        return self.norm(h)


class LlamaForCausalLM(DecoderLM):
    model_cls: type[LlamaModel] = LlamaModel
