"""Gemma 3 (text): interleaved sliding-window (local) and global attention layers.

What differs from Llama, matching transformers' ``Gemma3TextModel``:
- ``arch.layer_types[i]`` picks the layer kind. Local layers see the keys at positions
  ``p - sliding_window < k <= p`` and use RoPE theta ``rope_local_base_freq`` without scaling;
  global layers see all earlier keys and use ``rope_theta`` with ``rope_scaling``.
- RMSNorm multiplies by ``1 + w`` (``arch.norm_offset``); four norms per layer (input,
  post-attention, pre-feedforward, post-feedforward), the post norms applied before the residual add.
- qk-norm (also ``1 + w``) on every q and k head before RoPE.
- Embeddings scaled by ``sqrt(hidden)`` rounded to the model dtype (55.4256 -> 55.5 in bf16).
- Attention scale ``query_pre_attn_scalar ** -0.5``; GELU-tanh gated MLP; tied ``lm_head``;
  final logit soft-capping when set. transformers' Gemma3 does not apply
  ``attn_logit_softcapping`` (Gemma 3 replaced it with qk-norm), so neither do we.
"""

from __future__ import annotations

import torch
from torch import nn

from modelhive.errors import ConfigError
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


class Gemma3Attention(nn.Module):
    def __init__(self, arch: ArchConfig, is_sliding: bool, rotary: RotaryEmbedding,
                 dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            arch.num_heads, arch.num_kv_heads, arch.head_dim)
        self.qkv_proj = QKVLinear(arch.hidden_size, arch.num_heads, arch.num_kv_heads,
                                  arch.head_dim, False, dtype)
        self.o_proj = Linear(arch.q_size, arch.hidden_size, False, dtype)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, arch.norm_offset)
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, arch.norm_offset)
        self.rotary = rotary
        self.attn = PagedAttention(scale=arch.query_pre_attn_scalar ** -0.5,
                                   sliding_window=arch.sliding_window if is_sliding else None)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1)
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(meta.positions, q, k)
        out = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(out.flatten(1))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, is_sliding: bool, rotary: RotaryEmbedding,
                 dtype: torch.dtype):
        super().__init__()
        self.self_attn = Gemma3Attention(arch, is_sliding, rotary, dtype)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, arch.hidden_act, dtype)

        def norm() -> RMSNorm:
            return RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, arch.norm_offset)

        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def forward(self, h: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(h), meta, kv_cache)
        h = h + self.post_attention_layernorm(attn_out)
        mlp_out = self.mlp(self.pre_feedforward_layernorm(h))
        return h + self.post_feedforward_layernorm(mlp_out)


class Gemma3Model(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype)
        # HF keeps the scale as a tensor and casts it to the weight dtype before multiplying.
        self.register_buffer("embed_scale", torch.tensor(arch.embedding_multiplier).to(dtype),
                             persistent=False)
        self.rotary_global = RotaryEmbedding(arch.head_dim, arch.rope_theta,
                                             dict(arch.rope_scaling) or None)
        self.rotary_local = RotaryEmbedding(arch.head_dim, arch.rope_local_base_freq)
        layers = []
        for layer_type in arch.layer_types:
            is_sliding = layer_type == "sliding_attention"
            rotary = self.rotary_local if is_sliding else self.rotary_global
            layers.append(Gemma3DecoderLayer(arch, is_sliding, rotary, dtype))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, arch.norm_offset)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_caches: KVCaches) -> torch.Tensor:
        h = self.embed_tokens(input_ids) * self.embed_scale
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h = layer(h, meta, kv_cache)
        return self.norm(h)


class Gemma3ForCausalLM(DecoderLM):
    model_cls = Gemma3Model

    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device | str = "cpu"):
        unknown = set(arch.layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ConfigError(f"Gemma3 layer_types may only hold sliding_attention and "
                              f"full_attention, got {sorted(unknown)}")
        if "sliding_attention" in arch.layer_types and not arch.sliding_window:
            raise ConfigError("Gemma3 has sliding_attention layers but no sliding_window")
        if arch.query_pre_attn_scalar is None or arch.rope_local_base_freq is None:
            raise ConfigError("Gemma3 needs query_pre_attn_scalar and rope_local_base_freq")
        super().__init__(arch, dtype, device)
