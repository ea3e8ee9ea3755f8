"""Prompt logprobs (``SamplingParams.prompt_logprobs``; ``echo`` + ``logprobs`` on /v1/completions):
the engine scores every prompt token but the first, over chunked prefill, and the scores equal
transformers' log_softmax of a full forward on the same weights."""

from __future__ import annotations

import pytest
import torch

from modelhive import SamplingParams
from modelhive.bench.hf_baseline import build_hf_model
from modelhive.engine.engine import Engine
from modelhive.engine.output import TokenLogprob
from modelhive.engine.sequence import PromptScores
from modelhive.errors import InvalidRequestError
from modelhive.models.loader import resolve_source

from .test_hive import prompts


def long_prompts(vocab: int, count: int, seed: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=gen).tolist()

PRESETS = {"llama": "tiny-llama", "qwen2": "tiny-qwen2", "gemma3": "tiny-gemma3"}


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_prompt_logprobs_match_transformers_over_chunks(roomy_hive, model):
    preset = PRESETS[model]
    arch = resolve_source(f"preset:{preset}").arch
    long, short = long_prompts(arch.vocab_size, 2, 21, 150), prompts(arch.vocab_size, 1, 22)[0]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = roomy_hive.generate(model, [short], greedy)[0].token_ids
    # 150-token prompts in 128-token chunks (the fixture's budget), next to a plain request
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=3,
                             logprobs=0, n=2),
              SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=0),
              greedy]
    res = roomy_hive.generate_many([(model, long[0]), (model, long[1]), (model, short)], params)
    assert res[2].token_ids == alone and res[2].outputs[0].prompt_logprobs is None

    hf = build_hf_model(preset, arch, torch.float32, "cpu")
    for r, k in ((res[0], 3), (res[1], 0)):
        ids = r.prompt_token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        for out in r.outputs:
            got = out.prompt_logprobs
            assert [lp.token_id for lp in got] == ids[1:]
            want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            assert torch.allclose(torch.tensor([lp.logprob for lp in got]), want, atol=1e-4)
            for pos in (0, 63, 127, 128, len(ids) - 2):  # both chunks and their boundary
                assert len(got[pos].top) == k
                if k:
                    vals, top_ids = torch.topk(ref[pos], k)
                    assert [t[0] for t in got[pos].top] == top_ids.tolist()
                    assert torch.allclose(torch.tensor([t[2] for t in got[pos].top]), vals,
                                          atol=1e-4)
        # the prompt was scored, and the output still follows it greedily
        assert r.outputs[0].token_ids == r.outputs[1 % len(r.outputs)].token_ids


def test_rescored_prompt_positions_are_not_repeated(roomy_hive):
    """A sequence preempted before its first token recomputes (and rescores) its prompt: the
    positions it already has are kept once."""
    engine: Engine = roomy_hive.engine
    rid = engine.add_request("llama", list(range(3, 13)), SamplingParams(
        max_tokens=2, temperature=0.0, prompt_logprobs=0))
    live = engine._live[f"{rid}#0"]
    first = PromptScores(live.seq.seq_id, 1, tuple((t, -1.0 * t, ()) for t in range(4, 9)))
    again = PromptScores(live.seq.seq_id, 1, tuple((t, -1.0 * t, ()) for t in range(4, 13)))
    engine._add_prompt_scores(live, first)
    engine._add_prompt_scores(live, again)
    assert [lp.token_id for lp in live.prompt_logprobs] == list(range(4, 13))
    assert all(isinstance(lp, TokenLogprob) for lp in live.prompt_logprobs)
    engine.abort(rid)


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True])
def test_prompt_logprobs_is_checked(bad):
    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)
