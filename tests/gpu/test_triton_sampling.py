"""The Triton draw (``kernels/triton/sampling.py``) against its reference, the sampler's torch
path (``engine/sampler._draw``), on fresh random logits: the same token for every row, across
greedy, temperature, top-k, top-p, min-p and their mixes, peaked and flat rows (flat ones make
the threshold search take many passes), float32 and bf16 logits (bf16: ties at the cuts), more
tied tokens at a cut than the kernel sorts, and masked (-inf) entries.

Runs on CUDA; skipped without it. ``TRITON_INTERPRET=1`` runs the same checks on the CPU through
Triton's interpreter (slow; small vocabularies there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelhive.engine.sampler import _draw, _filter_rows
from tests.gpu.kernel_checks import DEVICE, INTERPRET, needs_gpu_numerics

# after kernel_checks, which skips this module without CUDA or Triton
sampling = pytest.importorskip("modelhive.kernels.triton.sampling")

VOCABS = [3000] if INTERPRET else [3000, 32000, 151936]


def settings_for(rng, rows, temperature=None, top_k=None, top_p=None, min_p=None):
    """``draw_settings`` rows: each column given, or a random mix."""
    s = np.zeros((rows, 6), dtype=np.float32)
    t = temperature if temperature is not None else rng.choice([0.0, 0.5, 0.8, 1.0, 1.5], rows)
    s[:, 0] = t
    s[:, 1] = np.where(s[:, 0] > 0, 1.0 / np.maximum(s[:, 0], 1e-30), 0.0)
    s[:, 2] = top_k if top_k is not None else rng.choice([0, 0, 1, 7, 50, 400, 10**6], rows)
    s[:, 3] = top_p if top_p is not None else rng.choice([1.0, 1.0, 0.1, 0.5, 0.9, 0.999], rows)
    s[:, 4] = min_p if min_p is not None else rng.choice([0.0, 0.0, 0.01, 0.2], rows)
    s[:, 5] = rng.random(rows, dtype=np.float32)
    return s


def reference_tokens(logits, settings):
    """Greedy rows: first maximum; the others: the torch path."""
    out = logits.float().argmax(-1)
    drawn = np.flatnonzero(settings[:, 0] > 0)
    if len(drawn):
        index = torch.as_tensor(drawn, device=logits.device)
        out[index] = _draw(logits[index], settings[drawn])
    return out


#: how far (in probability) a draw may sit from the reference's: float32 sums in another order
#: move each cumulative boundary, and a top-p cut, by about this much on a 152k-token row
TOL = 3e-5


def check(logits, settings):
    """The kernel's token of every row is the reference's, except where float rounding can
    explain the difference: the row's ``u`` within ``TOL`` of the kernel token's cumulative
    interval in the reference's distribution (computed in float64), and that token kept by the
    reference's filters or within ``TOL`` of its top-p cut. At most 5 % of the rows differ."""
    got = sampling.draw(logits, torch.from_numpy(settings).to(logits.device))
    want = reference_tokens(logits, settings)
    bad = (got != want).nonzero().flatten().tolist()
    assert len(bad) <= max(1, len(got) // 20), (len(bad), len(got))
    for r in bad:
        s, g = settings[r], got[r].item()
        assert s[0] > 0, f"greedy row {r}: {g} != {want[r].item()}"
        x = logits[r].float().cpu() * float(s[1])
        kept = _filter_rows(x[None].clone(), [int(s[2])], [1.0], [float(s[4])])[0]
        probs = torch.softmax(kept.double(), -1)  # after top-k and min-p only
        before = probs[kept > kept[g]].sum().item()
        in_top_p = s[3] >= 1.0 or before <= s[3] + TOL
        filtered = _filter_rows(x[None].clone(), [int(s[2])], [float(s[3])], [float(s[4])])[0]
        assert (torch.isfinite(filtered[g]) or in_top_p) and torch.isfinite(kept[g]), (r, g)
        cdf = torch.softmax(filtered.double(), -1).cumsum(0)
        lo, hi = (cdf[g - 1].item() if g else 0.0), cdf[g].item()
        assert lo - TOL <= s[5] <= hi + TOL, (r, g, want[r].item(), lo, hi, float(s[5]))
    return got


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_settings_draw_the_references_tokens(vocab, dtype):
    needs_gpu_numerics(getattr(torch, dtype))
    rng = np.random.default_rng(vocab)
    rows = 12 if INTERPRET else 96
    torch.manual_seed(vocab)
    scale = torch.tensor(rng.choice([0.05, 1.0, 3.0, 8.0], rows), dtype=torch.float32)
    logits = (torch.randn(rows, vocab) * scale[:, None]).to(getattr(torch, dtype)).to(DEVICE)
    check(logits, settings_for(rng, rows))


@pytest.mark.parametrize("setting", ["temperature", "top_k", "top_p", "top_k+top_p", "min_p"])
def test_each_filter_alone_over_the_whole_range_of_u(setting):
    """One row repeated with u spread over [0, 1): each draw is the reference's."""
    rng = np.random.default_rng(7)
    rows = 16 if INTERPRET else 512
    vocab = VOCABS[-1]
    torch.manual_seed(7)
    row = torch.randn(vocab) * 4
    logits = row.repeat(rows, 1).to(DEVICE)
    kw = dict(temperature=np.float32(0.9), top_k=0, top_p=1.0, min_p=0.0)
    kw.update({"temperature": {}, "top_k": dict(top_k=40), "top_p": dict(top_p=0.8),
               "top_k+top_p": dict(top_k=30, top_p=0.6), "min_p": dict(min_p=0.05)}[setting])
    settings = settings_for(rng, rows, **kw)
    settings[:, 5] = (np.arange(rows, dtype=np.float32) + 0.5) / rows
    check(logits, settings)


@pytest.mark.parametrize("top_k", [20, 1024, 1025, 2900])
def test_top_k_at_and_past_the_scratch_row_then_top_p_and_min_p(top_k):
    """Top-k up to ``CAP`` leaves the whole kept set in the scratch row, and top-p, min-p and
    the draw then run there; past it they take passes over the row; top-p alone on a peaked
    row also ends in the scratch row, on a flat one not. Every path draws the reference's
    tokens (the generation-config mix top-k 20 + top-p 0.8 + temperature 0.7 among them)."""
    assert sampling.CAP == 1024
    rng = np.random.default_rng(top_k)
    rows = 16 if INTERPRET else 256
    vocab = VOCABS[-1]
    torch.manual_seed(top_k)
    scale = torch.tensor(rng.choice([0.05, 1.0, 4.0, 12.0], rows), dtype=torch.float32)
    logits = (torch.randn(rows, vocab) * scale[:, None]).to(DEVICE)
    settings = settings_for(rng, rows, temperature=rng.choice([0.7, 1.0], rows).astype(
        np.float32), top_k=rng.choice([top_k, top_k, 0], rows),
        top_p=rng.choice([1.0, 0.8, 0.95], rows), min_p=rng.choice([0.0, 0.0, 0.05], rows))
    check(logits, settings)


def test_ties_at_the_cut_and_more_ties_than_the_kernel_sorts():
    """Integer-valued logits: many tokens share each value, so top-k and top-p cuts fall inside
    runs of ties (all kept); a row where thousands of tokens tie at the k-th value."""
    rng = np.random.default_rng(3)
    rows = 12 if INTERPRET else 64
    vocab = VOCABS[-1]
    torch.manual_seed(3)
    logits = torch.round(torch.randn(rows, vocab) * 2)
    logits[0] = 0.0
    logits[0, :5] = 3.0  # 5 tokens above a tie of vocab - 5 at the 6th value
    logits[1] = 0.0
    logits[1, 7] = 1.0
    settings = settings_for(rng, rows, temperature=np.float32(1.0),
                            top_k=rng.choice([0, 6, 20, 100], rows),
                            top_p=rng.choice([1.0, 0.3, 0.7, 0.95], rows), min_p=0.0)
    settings[0, 2:4] = (6, 1.0)
    settings[1, 2:4] = (0, 0.5)
    check(logits.to(DEVICE), settings)


def test_masked_entries_and_a_single_token_row():
    rng = np.random.default_rng(4)
    vocab = VOCABS[0]
    torch.manual_seed(4)
    logits = torch.randn(6, vocab) * 3
    logits[:, vocab // 2:] = float("-inf")  # e.g. padded vocabulary
    logits[5, :] = float("-inf")
    logits[5, 11] = 0.0  # only one token possible
    settings = settings_for(rng, 6, temperature=np.float32(1.0), top_k=[0, 5, 0, 3, 0, 2],
                            top_p=[1.0, 1.0, 0.5, 0.9, 1.0, 0.5],
                            min_p=[0.0, 0.0, 0.0, 0.0, 0.3, 0.0])
    got = check(logits.to(DEVICE), settings)
    assert (got[:5] < vocab // 2).all() and got[5].item() == 11


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 400 if INTERPRET else 8192
    logits = torch.log(probs).repeat(rows, 1).to(DEVICE)
    settings = settings_for(np.random.default_rng(5), rows, temperature=np.float32(1.0),
                            top_k=0, top_p=1.0, min_p=0.0)
    got = sampling.draw(logits, torch.from_numpy(settings).to(DEVICE))
    freq = torch.bincount(got.cpu(), minlength=4).float() / rows
    assert torch.allclose(freq, probs, atol=0.06 if INTERPRET else 0.02), freq


def test_out_and_strided_rows():
    rng = np.random.default_rng(6)
    vocab = VOCABS[0]
    wide = (torch.randn(5, vocab + 64) * 3).to(DEVICE)
    logits = wide[:, :vocab]  # rows strided past the vocabulary
    settings = settings_for(rng, 5)
    out = torch.full((5,), -1, dtype=torch.int64, device=DEVICE)
    assert sampling.draw(logits, torch.from_numpy(settings).to(DEVICE), out=out) is out
    assert out.tolist() == reference_tokens(logits.contiguous(), settings).tolist()
