"""Greedy outputs on the GPU (float32, Triton kernels) equal the CPU reference path token for
token on the tiny presets, all four models sharing one pool, eager and with CUDA graphs (decode
graphs, and prefill graphs for the steps of many tokens).

The GPU hive gets the CPU models' exact weights (preset weights are seeded per device type, so
they are copied over). Prompts of many lengths, decoded together, so decode batches of several
sizes (and graph buckets with padding) and chunked prefills all run. Skipped without CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from modelhive import Hive, ModelSpec, SamplingParams  # noqa: E402
from modelhive.planner.estimates import DECODE_STEPS  # noqa: E402

PRESETS = {"llama": "tiny-llama", "qwen2": "tiny-qwen2", "qwen3": "tiny-qwen3",
           "gemma3": "tiny-gemma3"}
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def specs() -> list[ModelSpec]:
    return [ModelSpec(name=n, source=f"preset:{p}", dtype="float32", max_model_len=256,
                      max_num_seqs=12, max_num_batched_tokens=96) for n, p in PRESETS.items()]


def workload() -> list[tuple[str, list[int]]]:
    rng = random.Random(7)
    work = []
    for name in PRESETS:
        for _ in range(7):
            work.append((name, [rng.randrange(3, 250) for _ in range(rng.randint(1, 70))]))
    rng.shuffle(work)
    return work


@pytest.fixture(scope="module")
def cpu_results() -> tuple[Hive, list[list[int]]]:
    hive = Hive(specs(), device="cpu", memory="2GiB")
    return hive, [r.token_ids for r in hive.generate_many(workload(), GREEDY)]


@pytest.mark.parametrize("graphs,steps", [(False, DECODE_STEPS), (True, 1), (True, DECODE_STEPS)],
                         ids=["eager", "cuda-graphs", "cuda-graphs-multi-step"])
def test_gpu_greedy_matches_cpu_reference(cpu_results, graphs, steps):
    cpu_hive, expected = cpu_results
    gpu = Hive(specs(), device="cuda", memory="3GiB", enforce_eager=not graphs,
               decode_steps=steps)
    for name in PRESETS:
        src = cpu_hive.engine.models[name].runner.model.state_dict()
        gpu.engine.models[name].runner.model.load_state_dict(src)
    got = [r.token_ids for r in gpu.generate_many(workload(), GREEDY, check_integrity=True)]
    mismatched = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(got)} sequences differ, first {mismatched[:5]}"
    if graphs:
        replays = [m.runner.decode_graphs for m in gpu.engine.models.values()]
        assert all(g is not None and g.graphs for g in replays)
        # steps of 17-96 tokens (several prompts at once) replayed prefill graphs
        prefill = [m.runner.prefill_graphs for m in gpu.engine.models.values()]
        assert all(p is not None and p.replays for p in prefill)
        # greedy decode batches ran several steps a replay (runner/decode_ahead.py)
        multi = [m.runner.ahead.multi_launched for m in gpu.engine.models.values()]
        assert all(multi) if steps > 1 else not any(multi), multi
        for g in replays:  # every bucket's logits are the first rows of one buffer per dtype
            starts = {buf.data_ptr() for buf in g.logits_buffers.values()}
            assert 1 <= len(starts) <= 2
            assert all(logits.data_ptr() in starts for _, logits, _ in g.graphs.values())


def test_gpu_draws_that_can_only_pick_the_argmax_match_cpu_greedy(cpu_results):
    """Drawn requests whose filters leave one token (top-k 1; min-p 1), seeded or not, with top-p
    and logprobs beside: through the graphs, decode-ahead's device draws and the shared logits
    buffers, they give the CPU's greedy tokens."""
    cpu_hive, expected = cpu_results
    gpu = Hive(specs(), device="cuda", memory="3GiB")
    for name in PRESETS:
        src = cpu_hive.engine.models[name].runner.model.state_dict()
        gpu.engine.models[name].runner.model.load_state_dict(src)
    kinds = [dict(temperature=0.8, top_k=1, seed=3), dict(temperature=1.3, top_k=1, top_p=0.9),
             dict(temperature=1.0, min_p=1.0), dict(temperature=0.7, top_k=1, logprobs=2)]
    params = [SamplingParams(max_tokens=40, ignore_eos=True, **kinds[i % len(kinds)])
              for i in range(len(expected))]
    got = gpu.generate_many(workload(), params, check_integrity=True)
    mismatched = [i for i, (r, want) in enumerate(zip(got, expected, strict=True))
                  if r.token_ids != want]
    assert not mismatched, f"{len(mismatched)} of {len(got)} differ, first {mismatched[:5]}"
    assert sum(m.runner.ahead.launched for m in gpu.engine.models.values()) > 0


def test_gpu_penalised_requests_run_ahead_and_match_the_cpu(cpu_results):
    """Greedy requests with repetition, frequency and presence penalties: on the GPU their
    decode steps run ahead of the host (the launch counts the token the host has not seen:
    ``runner/decode_ahead.py``), one step a replay; their tokens equal the CPU path's."""
    cpu_hive, _ = cpu_results
    kinds = [dict(repetition_penalty=1.3), dict(frequency_penalty=0.6, presence_penalty=0.4),
             dict(repetition_penalty=1.2, presence_penalty=0.8)]
    params = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                             **kinds[i % len(kinds)]) for i in range(len(workload()))]
    expected = [r.token_ids for r in cpu_hive.generate_many(workload(), params)]
    gpu = Hive(specs(), device="cuda", memory="3GiB")
    for name in PRESETS:
        src = cpu_hive.engine.models[name].runner.model.state_dict()
        gpu.engine.models[name].runner.model.load_state_dict(src)
    got = gpu.generate_many(workload(), params, check_integrity=True)
    mismatched = [i for i, (r, want) in enumerate(zip(got, expected, strict=True))
                  if r.token_ids != want]
    assert not mismatched, f"{len(mismatched)} of {len(got)} differ, first {mismatched[:5]}"
    runners = [m.runner for m in gpu.engine.models.values()]
    assert all(r.ahead.taken > 0 for r in runners)
    assert not any(r.ahead.multi_launched for r in runners)  # their argmax has no penalties


def test_gpu_prompt_logprobs_match_cpu_reference(cpu_results):
    """Prompt logprobs (eager steps amid graph replays and decodes launched ahead) equal the CPU
    path's, and the plain requests beside them keep their greedy tokens."""
    cpu_hive, expected = cpu_results
    gpu = Hive(specs(), device="cuda", memory="3GiB", enforce_eager=False)
    for name in PRESETS:
        src = cpu_hive.engine.models[name].runner.model.state_dict()
        gpu.engine.models[name].runner.model.load_state_dict(src)
    work = workload()
    scored = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    params = [scored if i % 3 == 0 else GREEDY for i in range(len(work))]
    want = cpu_hive.generate_many(work, params)
    got = gpu.generate_many(work, params, check_integrity=True)
    assert [r.token_ids for r in got] == expected
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        gl, wl = g.outputs[0].prompt_logprobs, w.outputs[0].prompt_logprobs
        if i % 3:
            assert gl is None
            continue
        assert [lp.token_id for lp in gl] == work[i][1][1:] == [lp.token_id for lp in wl]
        for a, b in zip(gl, wl, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-3
            assert [t[0] for t in a.top] == [t[0] for t in b.top]


def test_gpu_logprobs_requests_run_ahead_and_match_the_cpu(cpu_results):
    """Requests with logprobs (0-3 alternatives; greedy, and drawn with top-k 1) beside plain
    ones: their decode steps run ahead of the host (the launched step's logprobs are copied
    with its tokens), one step a replay; tokens equal the CPU's greedy ones, and logprobs and
    alternatives equal the CPU path's."""
    cpu_hive, expected = cpu_results
    kinds = [dict(logprobs=0), dict(logprobs=3), dict(), dict(temperature=0.9, top_k=1, logprobs=1)]
    params = [SamplingParams(max_tokens=40, ignore_eos=True, **{"temperature": 0.0,
                                                               **kinds[i % len(kinds)]})
              for i in range(len(expected))]
    want = cpu_hive.generate_many(workload(), params)
    gpu = Hive(specs(), device="cuda", memory="3GiB")
    for name in PRESETS:
        src = cpu_hive.engine.models[name].runner.model.state_dict()
        gpu.engine.models[name].runner.model.load_state_dict(src)
    got = gpu.generate_many(workload(), params, check_integrity=True)
    assert [r.token_ids for r in got] == expected
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        gl, wl = g.outputs[0].logprobs, w.outputs[0].logprobs
        if params[i].logprobs is None:
            assert gl is None
            continue
        assert len(gl) == len(wl) == 40
        for a, b in zip(gl, wl, strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-3
            assert [t[0] for t in a.top] == [t[0] for t in b.top]
            assert len(a.top) == params[i].logprobs
    runners = [m.runner for m in gpu.engine.models.values()]
    assert all(r.ahead.taken > 0 for r in runners)
