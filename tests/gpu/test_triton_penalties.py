"""The Triton penalties (``kernels/triton/penalties.py``) against their reference, the torch path
(``engine/penalties._penalise``), on fresh random inputs: the same float32 values to the bit,
for rows of every penalty mix, float32 and bf16 logits, histories with many repeats and with
none, generated parts from empty to whole, tokens launched ahead (``pending``), more rows than
the kernel has programs (its counts must be back at zero between a program's rows), and a
Qwen-sized vocabulary. Runs on CUDA; skipped without it (the interpreter has no libdevice).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelhive.engine import penalties
from modelhive.engine.sequence import ScheduledSeq
from modelhive.sampling_params import SamplingParams
from tests.gpu.kernel_checks import DEVICE, compiled_variants, needs_gpu_numerics

# after kernel_checks, which skips this module without CUDA or Triton
kernel = pytest.importorskip("modelhive.kernels.triton.penalties")


def batch(rng, rows, vocab, counts=True):
    """Rows of mixed penalties and histories (a quarter without any)."""
    items = []
    for r in range(rows):
        if r % 4 == 3:
            items.append(ScheduledSeq(f"s{r}", (1,), 0, (0,), True, SamplingParams(), 0, (), 0))
            continue
        p = dict(repetition_penalty=float(rng.choice([1.0, 1.1, 1.7, 0.8])))
        if counts:
            p.update(frequency_penalty=float(rng.choice([0.0, 0.2, -0.7, 1.5])),
                     presence_penalty=float(rng.choice([0.0, 0.5, -1.0])))
        n = int(rng.integers(1, 2500))
        pool = int(rng.choice([8, 200, vocab]))  # many repeats, some, almost none
        history = tuple(int(t) for t in rng.integers(0, min(pool, vocab), n))
        n_prompt = int(rng.choice([0, n // 2, n, n + 5]))
        items.append(ScheduledSeq(f"s{r}", (1,), 0, (0,), True, SamplingParams(**p), 0,
                                  history, n_prompt))
    return items


def both(logits, items, pending=None):
    """``penalised`` through the kernel and through the torch path."""
    got = penalties.penalised(logits, items, pending)
    saved = penalties.ops.penalty_kernel
    penalties.ops.penalty_kernel = lambda _: None
    try:
        want = penalties.penalised(logits, items, pending)
    finally:
        penalties.ops.penalty_kernel = saved
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rows,vocab,k", [(1, 3000, 0), (7, 3000, 1), (40, 32000, 4),
                                          (300, 3000, 1), (260, 151936, 2)])
def test_kernel_writes_the_torch_paths_values(rows, vocab, k, dtype):
    needs_gpu_numerics(dtype, libdevice=True)
    rng = np.random.default_rng(rows * 7 + k)
    torch.manual_seed(rows)
    logits = (torch.randn(rows, vocab, device=DEVICE) * 4).to(dtype)
    items = batch(rng, rows, vocab)
    pending = (torch.from_numpy(rng.integers(0, vocab, (rows, k))).to(DEVICE) if k else None)
    got, want = both(logits, items, pending)
    assert torch.equal(got, want), (got - want).abs().max()
    assert not torch.equal(got, logits.float())


def test_repetition_only_and_a_strided_logits_view():
    needs_gpu_numerics(libdevice=True)
    rng = np.random.default_rng(3)
    wide = torch.randn(20, 5100, device=DEVICE) * 3
    logits = wide[:, 50:5050]  # row stride 5100, as a bucket's view of a logits buffer
    items = batch(rng, 20, 5000, counts=False)
    got, want = both(logits, items)
    assert torch.equal(got, want)


def test_groups_of_rows_equal_one_launch(monkeypatch):
    """Histories past ``PENALTY_KERNEL_GROUP_ENTRIES`` go in several launches: same values."""
    needs_gpu_numerics(libdevice=True)
    from modelhive.planner import estimates

    rng = np.random.default_rng(4)
    logits = torch.randn(30, 4000, device=DEVICE) * 3
    items = batch(rng, 30, 4000)
    pending = torch.from_numpy(rng.integers(0, 4000, (30, 1))).to(DEVICE)
    whole = penalties.penalised(logits, items, pending)
    monkeypatch.setattr(estimates, "PENALTY_KERNEL_GROUP_ENTRIES", 3000)
    assert torch.equal(penalties.penalised(logits, items, pending), whole)


def test_new_row_counts_and_settings_compile_nothing_new():
    """Row counts, strides, pending tokens at any alignment and repetition-only steps run the
    variant already compiled: a compile in the middle of serving stalls every stream."""
    needs_gpu_numerics(libdevice=True)
    rng = np.random.default_rng(8)
    vocab = 3000
    wide = torch.randn(64, vocab + 40, device=DEVICE)

    def step(rows, counts=True, offset=0):
        items = batch(rng, rows, vocab, counts)
        spare = torch.from_numpy(rng.integers(0, vocab, (rows, 3))).to(DEVICE)
        got, want = both(wide[:rows, offset:offset + vocab], items, spare[:, 1:2])
        assert torch.equal(got, want)

    step(5)
    before = compiled_variants(kernel._penalty_kernel)
    for rows, counts, offset in [(1, True, 0), (16, True, 3), (17, False, 0), (64, True, 40),
                                 (2, False, 7)]:
        step(rows, counts, offset)
    assert compiled_variants(kernel._penalty_kernel) == before


def test_ids_outside_the_logits_are_ignored():
    """Ids the logits do not have are dropped on the host, down to none at all."""
    needs_gpu_numerics(libdevice=True)
    logits = torch.randn(2, 100, device=DEVICE)
    p = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5)
    items = [ScheduledSeq("a", (1,), 0, (0,), True, p, 0, (5000, 6000), 1),
             ScheduledSeq("b", (1,), 0, (0,), True, p, 0, (3, 700, 3), 1)]
    pending = torch.tensor([[7], [9]], device=DEVICE)
    got, want = both(logits, items, pending)
    assert torch.equal(got, want)
    got, want = both(logits[:1], items[:1])  # nothing left to penalise
    assert torch.equal(got, want) and torch.equal(got, logits[:1])
