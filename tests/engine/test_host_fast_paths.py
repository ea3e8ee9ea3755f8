"""The engine's per-token fast paths (no decode for tokens whose text the tokenizer knows, the
memoized one-token decode, stop rules fixed at admission) change no output: the same requests
give the same completions with the tokenizer's shortcuts turned off."""

from __future__ import annotations

import random

from modelhive import Hive, SamplingParams

PARAMS = [
    SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=30, temperature=0.0, stop=["<|t3", "9|>"]),
    SamplingParams(max_tokens=30, temperature=0.0, stop=["|><"], include_stop_str_in_output=True),
    SamplingParams(max_tokens=20, temperature=1.5, seed=4, logprobs=2, n=2),
    SamplingParams(max_tokens=20, temperature=1.2, seed=5, skip_special_tokens=False,
                   stop_token_ids=[300, 301, 302, 303, 304], min_tokens=4),
    SamplingParams(max_tokens=200, temperature=2.0, seed=6, stop=["\ufffd"]),  # max_model_len
    SamplingParams(max_tokens=25, temperature=0.0, repetition_penalty=1.3,
                   stop=["e"], include_stop_str_in_output=True),
]


def completions(hive: Hive, model: str) -> list:
    rng = random.Random(0)
    work = [(model, [rng.randrange(512) for _ in range(rng.randint(1, 60))]) for _ in PARAMS]
    work.append((model, "caf\u00e9 \U0001f41d <|im_start|>"))
    results = hive.generate_many(work, PARAMS + [PARAMS[0]])
    return [(o.text, o.token_ids, o.finish_reason, o.logprobs) for r in results for o in r.outputs]


def test_outputs_equal_with_the_tokenizer_shortcuts_off(roomy_hive: Hive, monkeypatch):
    fast = completions(roomy_hive, "llama")
    assert any(reason == "stop" for _, _, reason, _ in fast)
    tok = roomy_hive.tokenizer("llama")
    monkeypatch.setattr(tok, "appended_text", lambda token_id: None)
    monkeypatch.setattr(tok, "decode_token", lambda token_id, skip: tok.decode([token_id], skip))
    assert completions(roomy_hive, "llama") == fast
