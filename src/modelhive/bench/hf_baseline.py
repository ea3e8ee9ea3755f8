"""transformers ``generate`` on the same weights, in the same process: the baseline of every ratio.

For ``preset:NAME`` the HF model is built from the preset's config and filled from the same
``iter_preset_weights`` stream our loader uses (same seeds, same device), so both run identical
weights.
"""

from __future__ import annotations

import time

import torch

from modelhive.models.arch import ArchConfig


def build_hf_model(preset: str, arch: ArchConfig, dtype: torch.dtype, device: torch.device | str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from modelhive.models.presets import PRESET_CONFIGS, iter_preset_weights

    cfg = dict(PRESET_CONFIGS[preset])
    model_type = cfg.pop("model_type")
    cfg.pop("torch_dtype", None)
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dict(iter_preset_weights(preset, arch, dtype, device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (arch.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF {model_type} does not match preset {preset}: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    if arch.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@torch.inference_mode()
def hf_generate_seconds(model, prompts: torch.Tensor, new_tokens: int, repeats: int = 1) -> float:
    """Median wall seconds of greedy ``generate`` of exactly ``new_tokens`` for ``prompts`` [B, L]."""
    mask = torch.ones_like(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0)
    model.generate(prompts, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(prompts, **kwargs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert out.shape[1] == prompts.shape[1] + new_tokens
    times.sort()
    return times[len(times) // 2]
