"""The CPU's draw from the top-k candidates (``sampler._draw_from_top_k``) against the full
path over the whole vocabulary (``sampler._draw_filtered``), on random logits."""

import numpy as np
import pytest
import torch

from modelhive.engine import sampler


def settings_for(rng, rows, top_k, top_p, min_p, temperature=0.8):
    s = np.zeros((rows, 6), dtype=np.float32)
    s[:, 0] = temperature
    s[:, 1] = 1.0 / s[:, 0]
    s[:, 2] = rng.choice(top_k, rows)
    s[:, 3] = rng.choice(top_p, rows)
    s[:, 4] = rng.choice(min_p, rows)
    s[:, 5] = rng.random(rows, dtype=np.float32)
    return s


def full_path(logits, settings):
    x = logits.float() * torch.from_numpy(settings[:, 1:2])
    return sampler._draw_filtered(x, settings)


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0, 12.0])
def test_top_k_candidates_draw_what_the_full_path_draws(scale):
    """Top-k from 1 to past ``TOP_K_CANDIDATES`` (and off), with and without top-p and
    min-p, on flat to peaked rows: every row's token is the full path's."""
    rng = np.random.default_rng(int(scale * 10))
    torch.manual_seed(int(scale * 10))
    rows, vocab = 96, 6000
    logits = torch.randn(rows, vocab) * scale
    logits[5, 3000:] = float("-inf")  # a masked tail
    settings = settings_for(rng, rows, [0, 1, 7, 20, 40, 50, 400, 1024, 1025, vocab + 5],
                            [1.0, 1.0, 0.5, 0.8, 0.95], [0.0, 0.0, 0.05])
    got = sampler._draw(logits, settings)
    assert got.tolist() == full_path(logits, settings).tolist()
    # and each row alone draws what it drew in the batch
    for r in range(0, rows, 7):
        assert sampler._draw(logits[r:r + 1], settings[r:r + 1]).item() == got[r].item()


def test_ties_at_the_k_th_value_past_the_candidates_take_the_full_path():
    """Integer logits tie at the k-th value: a row whose tie runs past its candidates is
    drawn by the full path, and ties inside them are kept; u spread over [0, 1)."""
    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    rows, vocab = 64, 3000
    logits = torch.round(torch.randn(rows, vocab) * 2)
    logits[0] = 0.0
    logits[0, :5] = 3.0  # the 6th value ties with 2,995 tokens
    settings = settings_for(rng, rows, [1, 6, 20, 100], [1.0, 0.3, 0.7], [0.0, 0.2], 1.0)
    settings[0, 2] = 6
    settings[:, 5] = (np.arange(rows, dtype=np.float32) + 0.5) / rows
    x = logits * torch.from_numpy(settings[:, 1:2])
    token = torch.empty(rows, dtype=torch.int64)
    rest = sampler._draw_from_top_k(x, np.arange(rows), settings, token)
    assert 0 in rest and len(rest) < rows
    assert sampler._draw(logits, settings).tolist() == full_path(logits, settings).tolist()


def test_draws_from_the_candidates_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    rows = 8000
    logits = torch.log(probs).repeat(rows, 1)
    settings = settings_for(np.random.default_rng(5), rows, [3], [1.0], [0.0], 1.0)
    got = sampler._draw(logits, settings)
    freq = torch.bincount(got, minlength=5).float() / rows
    kept = probs[:3] / probs[:3].sum()
    assert torch.allclose(freq[:3], kept, atol=0.02) and freq[3:].sum() == 0, freq
