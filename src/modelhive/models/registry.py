"""Architecture name -> model class, imported lazily so unused architectures cost nothing."""

from __future__ import annotations

import importlib

from modelhive.errors import ConfigError
from modelhive.models.arch import ArchConfig
from modelhive.models.base import CausalLM

_MODELS = {
    "llama": ("modelhive.models.llama", "LlamaForCausalLM"),
    "qwen2": ("modelhive.models.qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("modelhive.models.qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("modelhive.models.gemma3", "Gemma3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(arch: ArchConfig) -> type[CausalLM]:
    if arch.arch not in _MODELS:
        raise ConfigError(f"unsupported architecture {arch.arch!r}; supported: {', '.join(_MODELS)}")
    module, cls = _MODELS[arch.arch]
    return getattr(importlib.import_module(module), cls)
