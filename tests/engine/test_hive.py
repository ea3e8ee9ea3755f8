"""The engine end to end on tiny presets of three architectures sharing one pool (CPU, float32)."""

from __future__ import annotations

import random

import pytest

from modelhive import Hive, SamplingParams
from modelhive.errors import ConfigError, InvalidRequestError, ModelNotFoundError, PlanError
from tests.engine.conftest import THREE, budget_for_blocks

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def prompts(model_vocab: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, model_vocab) for _ in range(rng.randint(3, 40))] for _ in range(count)]


def test_api_returns_text_tokens_and_finish_reason(roomy_hive: Hive):
    res = roomy_hive.generate("llama", ["Hello"], SamplingParams(max_tokens=16, temperature=0.0,
                                                                 ignore_eos=True))
    assert len(res) == 1
    assert len(res[0].token_ids) == 16 and res[0].finish_reason == "length"
    assert isinstance(res[0].text, str) and res[0].text
    assert res[0].text == roomy_hive.tokenizer("llama").decode(res[0].token_ids)


def test_batch_invariance_alone_batched_and_interleaved_across_models(roomy_hive: Hive):
    target = prompts(512, 1, seed=1)[0]
    alone = roomy_hive.generate("llama", [target], GREEDY)[0].token_ids
    batched = roomy_hive.generate("llama", [target] + prompts(512, 30, seed=2), GREEDY)[0].token_ids
    mixed = [("qwen2", p) for p in prompts(1024, 10, seed=3)]
    mixed += [("llama", target)] + [("gemma3", p) for p in prompts(1024, 10, seed=4)]
    mixed += [("llama", p) for p in prompts(512, 5, seed=5)]
    interleaved = roomy_hive.generate_many(mixed, GREEDY, check_integrity=True)[10].token_ids
    assert alone == batched == interleaved
    roomy_hive.engine.check_integrity()
    assert roomy_hive.engine.allocator.num_free_blocks == roomy_hive.engine.pool.num_blocks


def test_preemption_across_models_gives_identical_outputs(roomy_hive: Hive):
    work = [(m, p) for m, v, s in (("llama", 512, 10), ("qwen2", 1024, 11), ("gemma3", 1024, 12))
            for p in prompts(v, 12, seed=s)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = [r.token_ids for r in roomy_hive.generate_many(work, params)]
    tight = Hive(THREE, device="cpu", memory=budget_for_blocks(THREE, 24))
    got = tight.generate_many(work, params, check_integrity=True)
    preemptions = tight.engine.scheduler.num_preemptions
    assert sum(preemptions.values()) > 0, "the pool was meant to be too small"
    assert [r.token_ids for r in got] == expected
    tight.engine.check_integrity()
    assert tight.engine.allocator.num_free_blocks == tight.engine.pool.num_blocks


def test_seeded_sampling_reproducible_across_batches(roomy_hive: Hive):
    p = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=42, ignore_eos=True)
    target = prompts(512, 1, seed=7)[0]
    alone = roomy_hive.generate("llama", [target], p)[0].token_ids
    others = roomy_hive.generate("llama", prompts(512, 6, seed=8) + [target], p)[-1].token_ids
    assert alone == others


def test_n_completions_stop_tokens_and_stop_strings(roomy_hive: Hive):
    base = roomy_hive.generate("qwen2", [[5, 6, 7]], GREEDY)[0]
    stop_tok = base.token_ids[5]
    first = base.token_ids.index(stop_tok)
    res = roomy_hive.generate("qwen2", [[5, 6, 7]], SamplingParams(
        max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_tok,)))[0]
    assert res.finish_reason == "stop" and res.token_ids == base.token_ids[: first + 1]
    n3 = roomy_hive.generate("qwen2", [[5, 6, 7]], SamplingParams(
        max_tokens=8, temperature=1.0, seed=3, n=3, ignore_eos=True))[0]
    assert len(n3.outputs) == 3 and all(len(o.token_ids) == 8 for o in n3.outputs)
    text = base.text
    if len(text) > 4:
        stop = text[2:4]
        res = roomy_hive.generate("qwen2", [[5, 6, 7]], SamplingParams(
            max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
        assert res.finish_reason == "stop" and res.text == text[: text.index(stop)]


def test_seeded_n_choices_differ_and_reproduce(roomy_hive: Hive):
    """With a seed, choice i draws with seed + i (vLLM's parallel sampling): the choices differ,
    the request reproduces, and choice 0 is the same request with n = 1."""
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=11, n=3, ignore_eos=True)
    first = [o.token_ids for o in roomy_hive.generate("llama", [[5, 6, 7]], p)[0].outputs]
    again = [o.token_ids for o in roomy_hive.generate("llama", [[5, 6, 7]], p)[0].outputs]
    assert first == again and len(set(map(tuple, first))) == 3
    one = roomy_hive.generate("llama", [[5, 6, 7]], SamplingParams(
        max_tokens=12, temperature=1.0, seed=12, ignore_eos=True))[0].token_ids
    assert first[1] == one  # choice 1 of seed 11 is seed 12's draw


def test_choice_seed_stays_a_valid_seed():
    from modelhive.engine.engine import choice_params

    top = SamplingParams(seed=2**64 - 1, n=3)
    assert choice_params(top, 0) is top and choice_params(top, 2).seed == 1
    assert choice_params(SamplingParams(n=2), 1).seed is None


def test_abort_returns_blocks(roomy_hive: Hive):
    eng = roomy_hive.engine
    rid = eng.add_request("gemma3", [3, 4, 5, 6], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.allocator.num_used_blocks("gemma3") > 0
    deltas = eng.abort(rid)
    assert [d.finish_reason for d in deltas] == ["abort"]
    eng.check_integrity()
    assert eng.allocator.num_free_blocks == eng.pool.num_blocks and not eng.has_work


def test_bad_input_raises_clear_errors_and_disturbs_nothing(roomy_hive: Hive):
    eng = roomy_hive.engine
    with pytest.raises(ModelNotFoundError, match="llama"):
        roomy_hive.generate("nope", ["hi"], GREEDY)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        roomy_hive.generate("llama", [[5] * 300], GREEDY)
    with pytest.raises(InvalidRequestError) as info:
        roomy_hive.generate("llama", [[5, 6], [7] * 400], GREEDY)  # second prompt is bad
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(InvalidRequestError, match="vocab"):
        roomy_hive.generate("llama", [[1, 2, 10**6]], GREEDY)
    assert not eng.has_work and eng.allocator.num_free_blocks == eng.pool.num_blocks
    assert len(roomy_hive.generate("llama", [[5, 6, 7]], GREEDY)[0].token_ids) == 24


def test_bad_specs_fail_before_loading():
    from modelhive import ModelSpec

    with pytest.raises(ConfigError, match="source"):
        Hive([ModelSpec(name="x", source="/no/such/model.gguf")], device="cpu")
    with pytest.raises(ConfigError, match="preset"):
        Hive([ModelSpec(name="x", source="preset:no-such-preset")], device="cpu")
    with pytest.raises(PlanError):
        Hive(THREE, device="cpu", memory="1MiB")
    for steps in (None, 0, 2.5, True):
        with pytest.raises(ConfigError, match="decode_steps"):
            Hive(THREE, device="cpu", decode_steps=steps)


def test_serving_gc_settings_apply_and_undo(roomy_hive: Hive):
    """``settle_for_serving`` freezes what exists and raises the young-generation threshold
    (``modelhive serve`` calls it once the engine is built); the undo restores both, and the
    engine generates the same either way."""
    import gc

    from modelhive.engine.hive import SERVING_GC_THRESHOLD, settle_for_serving, undo_serving_gc

    before = gc.get_threshold()
    want = roomy_hive.generate("llama", ["Hello"], GREEDY)[0].token_ids
    previous = settle_for_serving()
    try:
        assert previous == before
        assert gc.get_threshold()[0] == SERVING_GC_THRESHOLD and gc.get_freeze_count() > 0
        assert roomy_hive.generate("llama", ["Hello"], GREEDY)[0].token_ids == want
    finally:
        undo_serving_gc(previous)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_serving_gc_block_restores_the_collector_when_the_block_raises():
    """``serving_gc`` (the benchmarks' timed runs) undoes its settings even when the run fails."""
    import gc

    from modelhive.engine.hive import SERVING_GC_THRESHOLD, serving_gc

    before = gc.get_threshold()
    with pytest.raises(RuntimeError), serving_gc():
        assert gc.get_threshold()[0] == SERVING_GC_THRESHOLD and gc.get_freeze_count() > 0
        raise RuntimeError("a failed timed run")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_warm_up_runs_every_kind_and_leaves_no_trace(roomy_hive: Hive):
    """``Engine.warm_up`` (run by ``build_engine`` on CUDA) steps each model through every
    sampling path, then resets the counters and gives every block back; greedy outputs after it
    are what they were before."""
    eng = roomy_hive.engine
    work = prompts(500, 3, seed=11)
    before = [r.token_ids for r in roomy_hive.generate("qwen2", work, GREEDY)]
    steps = []
    inner = eng.step
    eng.step = lambda: steps.append(1) or inner()
    try:
        assert eng.warm_up() >= 0
    finally:
        del eng.step
    assert len(steps) >= 3 * 6  # each model: every kind alone, then all together
    assert eng.num_steps == 0 and not eng.prompt_tokens_total and not eng.generation_tokens_total
    eng.check_integrity()
    assert eng.allocator.num_free_blocks == eng.pool.num_blocks and not eng.has_work
    assert [r.token_ids for r in roomy_hive.generate("qwen2", work, GREEDY)] == before


def test_warm_up_fits_tight_limits():
    """A model whose limits refuse part of the warm-up (an 8-token ``max_model_len``, a
    ``max_queue`` of 2) warms up with what fits, without raising, and leaves no trace."""
    from modelhive import ModelSpec

    spec = ModelSpec(name="tight", source="preset:tiny-llama", dtype="float32", max_model_len=8,
                     max_num_seqs=2, max_queue=2)
    hive = Hive([spec], device="cpu", memory="256MiB")
    eng = hive.engine
    assert eng.warm_up() >= 0
    eng.check_integrity()
    assert eng.allocator.num_free_blocks == eng.pool.num_blocks and not eng.has_work
    assert eng.num_steps == 0 and not eng.prompt_tokens_total
    res = hive.generate("tight", [[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0,
                                                             ignore_eos=True))
    assert len(res[0].token_ids) == 3
