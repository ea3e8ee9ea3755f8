"""Parity of our architectures with transformers on tiny random models, through the real paged path.

Per architecture: a seeded random HF model (norm weights and biases randomized too, so a missing
``1 + w`` or bias shows), loaded into our model through ``load_weights``; then
(a) ``ArchConfig.from_hf_config`` counts the parameters HF has,
(b) chunked prefill + 32 decode steps give the logits of HF's full-sequence forward,
(c) 32 greedy tokens equal HF ``generate(do_sample=False)``,
(d) a sequence's logits do not change when it shares its forwards with a decode and a prefill.
The pool uses a tokens-per-block that is not a power of two and shuffled blocks.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from modelhive.models.arch import ArchConfig
from modelhive.models.registry import model_class

from .paged_harness import PagedHarness

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager",
            dtype="float32", bos_token_id=1, eos_token_id=None, pad_token_id=0)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)


def _llama() -> torch.nn.Module:
    return LlamaForCausalLM(LlamaConfig(**TINY, num_hidden_layers=2, rope_parameters=LLAMA3_ROPE))


def _qwen2() -> torch.nn.Module:
    cfg = Qwen2Config(**TINY, num_hidden_layers=2, tie_word_embeddings=True,
                      rope_parameters=dict(rope_type="linear", rope_theta=1e6, factor=2.0))
    return Qwen2ForCausalLM(cfg)


def _qwen3() -> torch.nn.Module:  # head_dim 24: heads * head_dim != hidden
    return Qwen3ForCausalLM(Qwen3Config(**TINY, num_hidden_layers=2, head_dim=24))


def _gemma3() -> torch.nn.Module:
    cfg = Gemma3TextConfig(
        **TINY, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                            "factor": 8.0}},
        final_logit_softcapping=3.0)
    return Gemma3ForCausalLM(cfg)


BUILDERS = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3": _gemma3}
PROMPT_LEN, NUM_DECODE = 21, 32


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair(request):
    """(HF model, our model with the HF weights loaded, ArchConfig)."""
    name = request.param
    torch.manual_seed(sum(map(ord, name)))
    hf = BUILDERS[name]().eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if p.dim() == 1:  # norms start at 1 (or 0 for Gemma's 1 + w) and biases at 0
                p.normal_(1.0 if "norm" in pname and name != "gemma3" else 0.0, 0.5)
    arch = ArchConfig.from_hf_config(hf.config.to_dict())
    assert arch.arch == name
    ours = model_class(arch)(arch, torch.float32, "cpu").eval()
    filled = ours.load_weights(hf.state_dict().items())
    assert filled == {n for n, _ in ours.named_parameters()}
    return hf, ours, arch


def _tokens(seed: int, n: int, vocab: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row ||ours - ref|| / ||ref||."""
    return (ours - ref).norm(dim=-1) / ref.norm(dim=-1)


def test_param_count(pair):
    hf, ours, arch = pair
    hf_count = sum(p.numel() for p in hf.parameters())
    assert arch.num_params() == hf_count
    assert sum(p.numel() for p in ours.parameters()) == hf_count


def test_paged_logits_match_hf(pair):
    hf, ours, arch = pair
    tokens = _tokens(1, PROMPT_LEN + NUM_DECODE, arch.vocab_size)
    harness = PagedHarness(ours, seed=1)
    assert harness.tokens_per_block & (harness.tokens_per_block - 1)  # not a power of two
    logits = harness.prefill_then_decode(tokens[:PROMPT_LEN], tokens[PROMPT_LEN:], num_chunks=2)
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    err = _rel_err(logits, ref)
    assert err.max() < 1e-4, f"max relative error {err.max():.2e} at position {int(err.argmax())}"


def test_greedy_matches_hf_generate(pair):
    hf, ours, arch = pair
    prompt = _tokens(2, PROMPT_LEN, arch.vocab_size)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NUM_DECODE, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    expected = out[0, PROMPT_LEN:].tolist()
    assert len(expected) == NUM_DECODE
    assert PagedHarness(ours, seed=2).greedy(prompt, NUM_DECODE) == expected


def test_batch_invariance(pair):
    _, ours, arch = pair
    a = _tokens(3, 21, arch.vocab_size)  # prefill 7 + 6, then 8 decodes
    b = _tokens(4, 19, arch.vocab_size)  # prefill 9 alone, then decodes next to a
    c = _tokens(5, 40, arch.vocab_size)  # prefills 4 tokens in every step
    a_steps = [a[:7], a[7:13]] + [[t] for t in a[13:]]

    alone = PagedHarness(ours, seed=3)
    sa = alone.new_sequence()
    ref = [alone.step([(sa, toks)])[0] for toks in a_steps]

    mixed = PagedHarness(ours, seed=4)
    sa, sb, sc = mixed.new_sequence(), mixed.new_sequence(), mixed.new_sequence()
    mixed.step([(sb, b[:9])])
    for i, toks in enumerate(a_steps):
        # given out of order on purpose: the harness puts the decodes first
        logits = mixed.step([(sc, c[4 * i:4 * i + 4]), (sa, toks), (sb, [b[9 + i]])])[1]
        err = _rel_err(logits, ref[i])
        assert err.max() < 1e-5, f"step {i}: relative error {err.max():.2e}"


def test_load_weights_reports_partial_fused_params_and_rejects_unknown_names(pair):
    hf, ours, _ = pair
    state = hf.state_dict()
    filled = ours.load_weights((k, v) for k, v in state.items() if ".k_proj." not in k)
    assert not any(".qkv_proj." in name for name in filled)  # k missing: q/k/v not complete
    assert "model.layers.0.mlp.gate_up_proj.weight" in filled
    with pytest.raises(ValueError, match="matches no parameter"):
        ours.load_weights([("model.layers.0.self_attn.bogus.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="does not fit"):
        ours.load_weights([("model.layers.0.self_attn.k_proj.weight", torch.zeros(3, 3))])
    ours.load_weights(state.items())  # restore for the other tests


def test_sparse_multimodal_gemma3_config_gets_hf_defaults():
    """A multimodal Gemma3 ``text_config`` lists few keys; the rest are Gemma3TextConfig defaults
    (head_dim 256, vocab 262208, query_pre_attn_scalar 256, rope thetas 1e6 / 1e4)."""
    text = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window": 16}
    arch = ArchConfig.from_hf_config({"model_type": "gemma3", "text_config": text})
    hf_config = Gemma3TextConfig(**{k: v for k, v in text.items() if k != "model_type"})
    assert arch == ArchConfig.from_hf_config(hf_config.to_dict())
    assert (arch.head_dim, arch.rope_theta, arch.rope_local_base_freq) == (256, 1e6, 1e4)
    with torch.device("meta"):
        hf = Gemma3ForCausalLM(hf_config)
    assert arch.num_params() == sum(p.numel() for p in hf.parameters())
