"""The batched sampler on CUDA: it never waits for the device, its deterministic stages equal
the CPU's on the same inputs, and its draws follow the distribution. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from modelhive.engine.sampler import _filter_rows, choose, penalised, sample  # noqa: E402
from modelhive.sampling_params import SamplingParams  # noqa: E402
from tests.unit.test_sampler import _mixed_batch, item  # noqa: E402


def test_choose_never_waits_for_the_device():
    """What a step launched ahead calls (``runner/decode_ahead.py``): penalties, filters, seeded
    and unseeded draws, a precomputed argmax; any host sync would raise here."""
    rng = np.random.default_rng(0)
    logits = torch.randn(24, 4096, device="cuda").to(torch.bfloat16)
    batches = [_mixed_batch(rng, 4096, 24),
               [it for it in _mixed_batch(rng, 4096, 24) if not it.history],
               [item(SamplingParams(temperature=0.8, top_p=0.9), f"u{i}") for i in range(24)]]
    gen = torch.Generator()
    gen.manual_seed(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            greedy = logits[:len(batch)].argmax(-1)
            choose(logits[:len(batch)], batch, gen, ahead=1, greedy=greedy)
            choose(logits[:len(batch)], batch, gen)
            pending = greedy[:, None].expand(-1, 2)  # tokens the host has not seen yet
            choose(logits[:len(batch)], batch, gen, ahead=2, greedy=greedy, pending=pending)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_filters_and_penalties_equal_the_cpu():
    rng = np.random.default_rng(1)
    torch.manual_seed(1)
    x = torch.randn(16, 3000) * 3
    top_k = [int(k) for k in rng.choice([0, 1, 20, 500], 16)]
    top_p = [float(p) for p in rng.choice([1.0, 0.3, 0.9], 16)]
    min_p = [float(p) for p in rng.choice([0.0, 0.02, 0.3], 16)]
    cpu = _filter_rows(x.clone(), top_k, top_p, min_p)
    gpu = _filter_rows(x.cuda(), top_k, top_p, min_p).cpu()
    assert torch.equal(torch.isfinite(cpu), torch.isfinite(gpu))
    items = _mixed_batch(rng, 3000, 16)
    on_cpu, on_gpu = penalised(x, items), penalised(x.cuda(), items)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)


def test_draws_follow_the_distribution_and_keep_to_the_filters():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs).repeat(8192, 1).cuda()
    gen = torch.Generator()
    gen.manual_seed(2)
    free = choose(logits, [item(SamplingParams(temperature=1.0), f"f{i}") for i in range(8192)],
                  gen)
    freq = torch.bincount(free, minlength=4).float().cpu() / 8192
    assert torch.allclose(freq, probs, atol=0.02), freq
    kept = choose(logits, [item(SamplingParams(temperature=1.0, top_k=2), f"k{i}")
                           for i in range(8192)], gen)
    assert set(kept.unique().tolist()) == {0, 1}
    seeded = [item(SamplingParams(temperature=1.0, seed=9), f"s{i}", num_generated=i)
              for i in range(64)]
    once = [t.token_id for t in sample(logits[:64], seeded, gen)]
    assert once == [t.token_id for t in sample(logits[:64], seeded, gen)]
    assert once[5] == sample(logits[:1], [seeded[5]], gen)[0].token_id


def test_seeded_draws_are_the_cpus():
    """The uniforms are made on the host, so a seeded request draws the same tokens on either
    device (logits far enough apart that float rounding cannot move a boundary)."""
    torch.manual_seed(5)
    logits = torch.randn(32, 50) * 2
    rows = [item(SamplingParams(temperature=0.9, top_p=0.95, seed=77), f"s{i}", num_generated=i)
            for i in range(32)]
    assert choose(logits.cuda(), rows).tolist() == choose(logits, rows).tolist()


def sampler_peak(rows: int, vocab: int) -> int:
    """Device bytes the costliest path (penalties over 600-token histories, top-p, min-p,
    logprobs) on model-dtype logits allocates above the logits."""
    torch.manual_seed(6)
    logits = torch.randn(rows, vocab, device="cuda").to(torch.bfloat16)
    history = tuple(range(3, 603))
    params = SamplingParams(temperature=0.8, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                            presence_penalty=0.3, logprobs=5)
    items = [item(params, f"m{i}", history=history, num_prompt=300) for i in range(rows)]
    sample(logits, items)  # warm-up: cuBLAS / cub workspaces are not the sampler's
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sample(logits, items)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch-path"])
@pytest.mark.parametrize("rows,vocab", [(200, 151936), (24, 151936), (8, 151936), (5, 32000)])
def test_peak_memory_is_within_the_plan(rows, vocab, kernel, monkeypatch):
    """The sampler's peak stays within ``planner.estimates.sampler_bytes`` and
    ``penalty_bytes`` (600-token histories), which the memory plan reserves, with the draw and
    penalty kernels (the draw kernel: steps of 8 rows or more) and without them."""
    from modelhive.engine import sampler
    from modelhive.planner import estimates
    from modelhive.planner.estimates import penalty_bytes, sampler_bytes

    monkeypatch.setattr(sampler, "KERNEL", kernel)
    monkeypatch.setattr(estimates, "SAMPLER_KERNEL", kernel)  # the penalties' switch
    # the held bf16 logits are not in the measured peak: 2 B an entry
    peak = sampler_peak(rows, vocab) + 2 * rows * vocab
    planned = sampler_bytes(rows, vocab, kernel, logits_bytes=2) + penalty_bytes(rows, 600,
                                                                                   kernel)
    assert peak <= planned, (peak / rows / vocab, planned / rows / vocab)
