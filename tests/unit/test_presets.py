"""Presets: real shapes without allocating, deterministic weights, byte tokenizer, load_model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modelhive.errors import ConfigError
from modelhive.models.arch import ArchConfig
from modelhive.models.loader import ModelSource, load_model, resolve_source
from modelhive.models.presets import PRESET_CONFIGS, preset_arch, preset_names
from modelhive.models.registry import model_class
from modelhive.models.tokenizer import ByteTokenizer
from tests.unit.hf_configs import QWEN2_5_3B, TINYLLAMA_1_1B

TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"]


@pytest.mark.parametrize("name,params", [
    ("tinyllama-1.1b", 1_100_048_384), ("qwen2.5-3b", 3_085_938_688), ("yi-6b", 6_061_035_520),
    ("qwen2.5-0.5b", 494_032_768), ("smollm2-135m", 134_515_008), ("gemma3-270m", 268_098_176),
    ("qwen3-0.6b", 596_049_920),
])
def test_big_preset_param_counts_without_allocating(name: str, params: int) -> None:
    assert preset_arch(name).num_params() == params


@pytest.mark.parametrize("name,hf", [("tinyllama-1.1b", TINYLLAMA_1_1B), ("qwen2.5-3b", QWEN2_5_3B)])
def test_preset_matches_hub_config(name: str, hf: dict) -> None:
    ours, theirs = preset_arch(name), ArchConfig.from_hf_config(hf)
    # the preset only differs in its token ids (byte tokenizer specials)
    assert dataclasses.replace(ours, bos_token_id=theirs.bos_token_id,
                               eos_token_ids=theirs.eos_token_ids) == theirs


def test_gemma3_270m_preset_layout() -> None:
    arch = preset_arch("gemma3-270m")
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim,
            arch.vocab_size, arch.sliding_window) == (18, 640, 4, 1, 256, 262144, 512)
    assert [i for i, t in enumerate(arch.layer_types) if t == "full_attention"] == [5, 11, 17]


def test_tiny_presets_are_tiny() -> None:
    for name in TINY:
        arch = preset_arch(name)
        assert 64 <= arch.hidden_size <= 128 and 2 <= arch.num_layers <= 4
        assert arch.vocab_size <= 1024
    assert {"tiny-llama", "yi-6b", "qwen3-0.6b"} <= set(preset_names())


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_source("preset:llama-9000")
    assert info.value.key == "source"
    assert "tinyllama-1.1b" in str(info.value) and "tiny-llama" in str(info.value)


@pytest.mark.parametrize("name", TINY)
def test_weights_cover_param_shapes_and_are_deterministic(name: str) -> None:
    src = resolve_source(f"preset:{name}")
    first = dict(src.iter_weights(torch.float32, "cpu"))
    second = dict(src.iter_weights(torch.float32, "cpu"))
    assert {k: tuple(v.shape) for k, v in first.items()} == src.arch.param_shapes()
    assert all(torch.equal(first[k], second[k]) for k in first)
    q = first["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, first["model.layers.1.self_attn.q_proj.weight"])
    assert 0.015 < q.std().item() < 0.025
    norm = first["model.layers.0.input_layernorm.weight"]
    assert torch.all(norm + src.arch.norm_offset == 1.0)  # effective weight 1 (Gemma: 1 + w)


def test_weights_made_in_requested_dtype() -> None:
    src = resolve_source("preset:tiny-qwen2")
    assert {t.dtype for _, t in src.iter_weights(torch.bfloat16, "cpu")} == {torch.bfloat16}


@pytest.mark.parametrize("name", TINY)
def test_load_model_builds_registry_model(name: str) -> None:
    src = resolve_source(f"preset:{name}")
    model = load_model(src, torch.float32, "cpu")
    assert type(model) is model_class(src.arch)
    embed = dict(src.iter_weights(torch.float32, "cpu"))["model.embed_tokens.weight"]
    assert torch.equal(dict(model.named_parameters())["model.embed_tokens.weight"], embed)


class _BrokenSource(ModelSource):
    def iter_weights(self, dtype, device):  # drops one tensor, adds an unknown one
        for name, tensor in super().iter_weights(dtype, device):
            if name != "model.layers.1.mlp.down_proj.weight":
                yield name, tensor
        yield "model.layers.9.mlp.extra.weight", torch.zeros(2)


def test_load_model_lists_missing_and_unexpected_tensors() -> None:
    good = resolve_source("preset:tiny-llama")
    broken = _BrokenSource(good.source, good.kind, good.arch, None, preset=good.preset)
    with pytest.raises(ConfigError) as info:
        load_model(broken, torch.float32, "cpu")
    message = str(info.value)
    assert "missing: model.layers.1.mlp.down_proj.weight" in message
    assert "unexpected: model.layers.9.mlp.extra.weight" in message


def test_byte_tokenizer_round_trip_specials_and_placeholders() -> None:
    tok = resolve_source("preset:tiny-llama").load_tokenizer()
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == PRESET_CONFIGS["tiny-llama"]["vocab_size"]
    text = "héllo wörld ✓ 你好"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([300, 104, 105]) == "<|t300|>hi"
    assert tok.id_to_token(tok.eos_token_ids[0]) == "<|eos|>"
    with pytest.raises(KeyError):
        tok.id_to_token(tok.vocab_size)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == ByteTokenizer.IM_START_ID and ByteTokenizer.IM_END_ID in ids
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.decode(ids) == "user\nhi\nassistant\n"


def test_with_chat_template_copies_and_validates(tmp_path) -> None:
    tok = resolve_source("preset:tiny-qwen3").load_tokenizer()
    custom = tok.with_chat_template("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert custom.apply_chat_template(messages) == "[a][b]"
    assert tok.apply_chat_template(messages).startswith("<|im_start|>user")  # original unchanged
    (tmp_path / "t.jinja").write_text("{{ messages | length }}")
    assert tok.with_chat_template(str(tmp_path / "t.jinja")).apply_chat_template(messages) == "2"
    with pytest.raises(ConfigError) as info:
        tok.with_chat_template("{% if %}")
    assert info.value.key == "chat_template"
