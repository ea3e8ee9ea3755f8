"""``preset:NAME`` sources: real architectures (exact HF config values) with seeded random weights.

For speed and memory work without checkpoints. The configs below are the published ``config.json``
values, turned into ``ArchConfig`` by ``ArchConfig.from_hf_config``, so a preset has exactly the
shapes, parameter count and KV bytes of the real model. Token ids 256..259 are the byte tokenizer's
specials (see ``ByteTokenizer``), so BOS/EOS of every preset point there.

Weights are generated on the target device in the target dtype (no CPU round trip, so a 6B preset
builds in a second on a GPU). Each tensor has its own generator seeded from sha256(preset/name): the
values are deterministic per (preset, tensor name, device type). Scales keep activations sane:
linears and embeddings ~N(0, 0.02), output projections (o_proj, down_proj) divided by
sqrt(2 x layers) like GPT-2, biases ~N(0, 0.02), norms at an effective weight of 1.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from modelhive.errors import ConfigError
from modelhive.models.arch import ArchConfig
from modelhive.models.tokenizer import ByteTokenizer

_LLAMA: dict[str, Any] = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False,
                          "torch_dtype": "bfloat16"}
_QWEN2: dict[str, Any] = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6,
                          "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                          "vocab_size": 151936, "attention_bias": True,
                          "torch_dtype": "bfloat16"}
_QWEN3: dict[str, Any] = {"model_type": "qwen3", "hidden_act": "silu", "rms_norm_eps": 1e-6,
                          "rope_theta": 1000000.0, "vocab_size": 151936, "attention_bias": False,
                          "torch_dtype": "bfloat16"}
_GEMMA3: dict[str, Any] = {"model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
                           "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                           "rope_local_base_freq": 10000.0, "attention_bias": False,
                           "tie_word_embeddings": True, "final_logit_softcapping": None,
                           "attn_logit_softcapping": None, "torch_dtype": "bfloat16"}


def _gemma3_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)]


#: preset name -> HF config.json values (only the keys ``ArchConfig.from_hf_config`` reads).
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
                       "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                       "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                       "tie_word_embeddings": False},
    "yi-6b": {**_LLAMA, "vocab_size": 64000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 4,
              "rms_norm_eps": 1e-5, "rope_theta": 5000000.0, "max_position_embeddings": 4096,
              "tie_word_embeddings": False},
    "smollm2-135m": {**_LLAMA, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
                     "tie_word_embeddings": True},
    "qwen2.5-0.5b": {**_QWEN2, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "tie_word_embeddings": True},
    "qwen2.5-3b": {**_QWEN2, "hidden_size": 2048, "intermediate_size": 11008,
                   "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                   "tie_word_embeddings": True},
    "qwen3-0.6b": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "head_dim": 128,
                   "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "max_position_embeddings": 40960, "tie_word_embeddings": True},
    "gemma3-270m": {**_GEMMA3, "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
                    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
                    "head_dim": 256, "max_position_embeddings": 32768, "sliding_window": 512,
                    "query_pre_attn_scalar": 256, "layer_types": _gemma3_layer_types(18)},
    # tiny test presets: same code paths, built in milliseconds on a CPU
    "tiny-llama": {**_LLAMA, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
                   "tie_word_embeddings": False},
    "tiny-qwen2": {**_QWEN2, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 160,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                   "max_position_embeddings": 1024, "tie_word_embeddings": True},
    "tiny-qwen3": {**_QWEN3, "vocab_size": 768, "hidden_size": 96, "intermediate_size": 192,
                   "head_dim": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "max_position_embeddings": 1024,
                   "tie_word_embeddings": False},
    "tiny-gemma3": {**_GEMMA3, "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
                    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
                    "head_dim": 32, "max_position_embeddings": 1024, "sliding_window": 16,
                    "query_pre_attn_scalar": 32, "layer_types": _gemma3_layer_types(4, pattern=2)},
}


def preset_names() -> list[str]:
    return sorted(PRESET_CONFIGS)


def preset_arch(name: str) -> ArchConfig:
    """``ArchConfig`` of preset ``name``; raises ``ConfigError(key="source")`` for an unknown name."""
    if name not in PRESET_CONFIGS:
        raise ConfigError(f"unknown preset {name!r}; use one of: {', '.join(preset_names())}",
                          key="source")
    cfg = {**PRESET_CONFIGS[name], "bos_token_id": ByteTokenizer.BOS_ID,
           "eos_token_id": [ByteTokenizer.EOS_ID, ByteTokenizer.IM_END_ID]}
    return ArchConfig.from_hf_config(cfg)


def _seed(preset: str, tensor_name: str) -> int:
    digest = hashlib.sha256(f"{preset}/{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def iter_preset_weights(name: str, arch: ArchConfig, dtype: torch.dtype,
                        device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every entry of ``arch.param_shapes()``, made on ``device``."""
    device = torch.device(device)
    out_scale = 1.0 / math.sqrt(2 * arch.num_layers)
    for tensor_name, shape in arch.param_shapes().items():
        if tensor_name.endswith("norm.weight"):
            # effective RMSNorm weight 1: Gemma stores w with (1 + w), the others w
            fill = 1.0 - arch.norm_offset
            yield tensor_name, torch.full(shape, fill, dtype=dtype, device=device)
            continue
        generator = torch.Generator(device=device)
        generator.manual_seed(_seed(name, tensor_name))
        tensor = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        std = 0.02
        if tensor_name.endswith(("o_proj.weight", "down_proj.weight")):
            std *= out_scale
        yield tensor_name, tensor.mul_(std)


def preset_tokenizer(arch: ArchConfig) -> ByteTokenizer:
    """Byte tokenizer over the preset's full vocabulary, with a ChatML template."""
    return ByteTokenizer(arch.vocab_size)
