"""Sampler: greedy, filters, penalties, seeded reproducibility, logprobs — on random logits."""

import math

import numpy as np
import pytest
import torch

from modelhive.engine.output import Detokenizer
from modelhive.engine.sampler import _filter_rows, choose, penalised, sample
from modelhive.engine.sequence import ScheduledSeq
from modelhive.errors import InvalidRequestError
from modelhive.sampling_params import SamplingParams


def item(params, seq_id="s", num_generated=0, history=(), num_prompt=0):
    return ScheduledSeq(seq_id, (1,), 0, (0,), True, params, num_generated, tuple(history), num_prompt)


def test_greedy_is_argmax_and_logprobs_are_raw_log_softmax():
    logits = torch.randn(4, 50)
    items = [item(SamplingParams(temperature=0.0, logprobs=3), f"s{i}") for i in range(4)]
    out = sample(logits, items)
    ref = torch.log_softmax(logits, -1)
    for row, tok in enumerate(out):
        assert tok.token_id == int(logits[row].argmax())
        assert math.isclose(tok.logprob, float(ref[row, tok.token_id]), rel_tol=1e-6)
        assert [t for t, _ in tok.top_logprobs] == ref[row].topk(3).indices.tolist()


def test_seeded_sampling_is_independent_of_batch_composition():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone = sample(logits[3:4].clone(), [item(p, num_generated=5)])[0].token_id
    others = [item(SamplingParams(temperature=1.0), f"o{i}") for i in range(8)]
    others[3] = item(p, num_generated=5)
    batched = sample(logits.clone(), others)[3].token_id
    assert alone == batched
    # a different step index draws different noise: over several steps the picks vary
    picks = {sample(logits[3:4].clone(), [item(p, num_generated=k)])[0].token_id for k in range(20)}
    assert len(picks) > 1


def test_model_dtype_logits_choose_as_their_float32_copy():
    """The CUDA LM head hands over bf16 logits above two rows: greedy rows (ties included),
    seeded draws and penalised rows choose exactly what the float32 copy of the same values
    chooses."""
    torch.manual_seed(0)
    logits = (torch.randn(6, 500) * 3).to(torch.bfloat16)
    logits[0, 7] = logits[0, 9] = logits[0].max() + 1  # a tie: the first index wins
    items = [item(SamplingParams(temperature=0.0), "g0"), item(SamplingParams(temperature=0.0)),
             item(SamplingParams(temperature=0.8, seed=3), "s1"),
             item(SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=4), "s2"),
             item(SamplingParams(temperature=0.0, repetition_penalty=1.3), "p", history=(5, 6)),
             item(SamplingParams(temperature=0.7, seed=5, presence_penalty=0.5), "q",
                  history=(1, 2))]
    got = choose(logits, items)
    assert got[0].item() == 7
    assert got.tolist() == choose(logits.float(), items).tolist()
    assert logits.dtype == torch.bfloat16  # penalties worked on a copy


def test_choose_takes_a_precomputed_argmax_unless_penalties_move_it():
    """A decode graph hands over each row's argmax (``ops.argmax``, into a buffer it keeps):
    ``choose`` returns that buffer with the drawn rows overwritten, and ignores it when a row
    is penalised (the penalties move the maximum)."""
    from modelhive.kernels import ops

    torch.manual_seed(1)
    logits = torch.randn(3, 200)
    buffer = torch.full((3,), -1, dtype=torch.int64)
    greedy = ops.argmax(logits, buffer)
    assert greedy is buffer and greedy.tolist() == logits.argmax(-1).tolist()
    items = [item(SamplingParams(temperature=0.0), "a"),
             item(SamplingParams(temperature=0.9, seed=11), "b"),
             item(SamplingParams(temperature=0.0), "c")]
    want = choose(logits, items).tolist()
    got = choose(logits, items, greedy=greedy)
    assert got is buffer and got.tolist() == want  # the drawn row's token written in place
    penalised = items[:2] + [item(SamplingParams(temperature=0.0, presence_penalty=2.0), "c",
                                  history=(int(logits[2].argmax()),))]
    stale = torch.full((3,), 0, dtype=torch.int64)
    assert choose(logits, penalised, greedy=stale).tolist() == choose(logits, penalised).tolist()


def test_seeded_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    counts = torch.zeros(3)
    for k in range(3000):
        tok = sample(logits.clone(), [item(SamplingParams(temperature=1.0, seed=7), num_generated=k)])
        counts[tok[0].token_id] += 1
    assert torch.allclose(counts / counts.sum(), torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_top_k_top_p_min_p_filters():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    keep = lambda f: torch.isfinite(f).nonzero().flatten().tolist()  # noqa: E731

    def _filter(x, top_k, top_p, min_p):  # one row
        return _filter_rows(x[None].clone(), [top_k], [top_p], [min_p])[0]

    assert keep(_filter(logits, 2, 1.0, 0.0)) == [0, 1]
    assert keep(_filter(logits, 0, 0.65, 0.0)) == [0, 1]  # 0.4 + 0.3 reaches 0.65
    assert keep(_filter(logits, 0, 0.71, 0.0)) == [0, 1, 2]
    assert keep(_filter(logits, 0, 1.0, 0.45)) == [0, 1, 2]  # p >= 0.45 * 0.4
    assert keep(_filter(logits, 0, 1.0, 0.6)) == [0, 1]
    for _ in range(50):  # sampling never leaves the kept set
        tok = sample(logits[None].clone(), [item(SamplingParams(temperature=1.0, top_k=2))])
        assert tok[0].token_id in (0, 1)


def test_penalties_change_greedy_choice_as_defined():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.0]])
    # repetition penalty divides positive logits of seen tokens (prompt included)
    rep = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits.clone(), [item(rep, history=(0,), num_prompt=1)])[0].token_id == 1
    # frequency penalty counts only generated tokens
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.1)
    assert sample(logits.clone(), [item(freq, history=(0, 0), num_prompt=1)])[0].token_id == 0
    assert sample(logits.clone(), [item(freq, history=(5, 0, 0), num_prompt=1)])[0].token_id == 1
    pres = SamplingParams(temperature=0.0, presence_penalty=0.2)
    assert sample(logits.clone(), [item(pres, history=(0,), num_prompt=0)])[0].token_id == 1


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"), ({"n": 0}, "n"),
    ({"logprobs": 99}, "logprobs"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": [""]}, "stop"), ({"seed": 1.5}, "seed"), ({"seed": 10**30}, "seed"),
    ({"top_k": 10**30}, "top_k"), ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
])
def test_invalid_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param and param in str(info.value)


def test_detokenizer_holds_back_partial_stop_strings_and_cuts_at_stop():
    d = Detokenizer(stop=("END",), include_stop=False)
    assert d.update("Hello E", finished=False) == ("Hello", False)
    assert d.update("Hello EN", finished=False) == (" ", False)  # "EN" may start "END"
    assert d.update("Hello ENX", finished=False) == ("E", False)
    assert d.update("Hello ENX END tail", finished=False) == ("NX ", True)
    assert d.text == "Hello ENX "
    d2 = Detokenizer(stop=("END",), include_stop=True)
    assert d2.update("a END", finished=False) == ("a END", True)
    d3 = Detokenizer(stop=(), include_stop=False)
    assert d3.update("ab\ufffd", finished=False) == ("ab", False)
    assert d3.update("abc", finished=True) == ("c", False)


# ------------------------------------------------- the batched stages against one row at a time
def _reference_filter(x, top_k, top_p, min_p):
    """One row, the plain way (the sampler before it was batched)."""
    if 0 < top_k < x.shape[-1]:
        x = x.masked_fill(x < torch.topk(x, top_k).values[-1], float("-inf"))
    if top_p < 1.0:  # keep a token if the tokens strictly more probable hold <= top_p
        probs = torch.softmax(x, dim=-1)
        before = torch.stack([probs[x > v].sum() for v in x])
        x = x.masked_fill(before > top_p, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs / probs.max() < min_p, float("-inf"))
    return x


def _reference_penalties(logits, it):
    p, history = it.params, torch.tensor(it.history, dtype=torch.long)
    row = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.unique(history)
        row[seen] = torch.where(row[seen] > 0, row[seen] / p.repetition_penalty,
                                row[seen] * p.repetition_penalty)
    counts = torch.bincount(history[it.num_prompt_tokens:], minlength=row.shape[0]).float()
    return row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()


def _mixed_batch(rng, vocab, n):
    items = []
    for i in range(n):
        kind = i % 6
        params = dict(temperature=[0.0, 0.7, 1.0, 1.3, 0.9, 0.5][kind], seed=1000 + i)
        if kind == 2:
            params.update(top_k=int(rng.integers(1, 40)))
        if kind == 3:
            params.update(top_p=float(rng.uniform(0.2, 0.95)))
        if kind == 4:
            params.update(min_p=float(rng.uniform(0.01, 0.3)), top_k=7, top_p=0.8)
        history = ()
        if i % 4 == 1:
            params.update(repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2)
            history = tuple(int(t) for t in rng.integers(0, vocab, 30))
        items.append(item(SamplingParams(**params), f"r{i}", num_generated=i, history=history,
                          num_prompt=10))
    return items


def test_batched_filters_equal_one_row_at_a_time():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    x = torch.randn(12, 300) * 3
    top_k = [int(k) for k in rng.choice([0, -1, 1, 5, 50, 299, 300, 1000], 12)]
    top_p = [float(p) for p in rng.choice([1.0, 0.1, 0.5, 0.9, 0.999], 12)]
    min_p = [float(p) for p in rng.choice([0.0, 0.05, 0.5], 12)]
    got = _filter_rows(x.clone(), top_k, top_p, min_p)
    for r in range(12):
        want = _reference_filter(x[r], top_k[r], top_p[r], min_p[r])
        assert torch.equal(torch.isfinite(got[r]), torch.isfinite(want)), (r, top_k[r], top_p[r])


def test_batched_penalties_equal_one_row_at_a_time():
    rng = np.random.default_rng(1)
    logits = torch.randn(8, 64) * 2
    items = _mixed_batch(rng, 64, 8)
    got = penalised(logits, items)
    for r, it in enumerate(items):
        want = _reference_penalties(logits[r], it) if it.history else logits[r]
        torch.testing.assert_close(got[r], want)


def test_a_mixed_batch_draws_what_each_seeded_row_draws_alone():
    """Greedy, temperature, top-k, top-p, min-p and penalised rows in one batch: each row's
    token is the one it gets sampled alone (seeded), over several steps."""
    rng = np.random.default_rng(2)
    for step in range(5):
        logits = torch.randn(12, 500) * 2
        items = _mixed_batch(rng, 500, 12)
        items = [item(it.params, it.seq_id, it.num_generated + step, it.history, 10)
                 for it in items]
        batched = sample(logits.clone(), items)
        for r, it in enumerate(items):
            assert batched[r].token_id == sample(logits[r:r + 1].clone(), [it])[0].token_id


def test_logprobs_per_row_count_and_raw_values():
    torch.manual_seed(3)
    logits = torch.randn(4, 80)
    ks = [None, 0, 2, 5]
    items = [item(SamplingParams(temperature=0.0 if k is None else 0.8, seed=5, logprobs=k),
                  f"l{i}") for i, k in enumerate(ks)]
    out = sample(logits.clone(), items)
    ref = torch.log_softmax(logits, -1)
    for row, (tok, k) in enumerate(zip(out, ks, strict=True)):
        if k is None:
            assert tok.logprob is None and tok.top_logprobs is None
            continue
        assert math.isclose(tok.logprob, float(ref[row, tok.token_id]), rel_tol=1e-6)
        assert [t for t, _ in tok.top_logprobs] == ref[row].topk(k).indices.tolist()


def test_uniforms_are_keyed_by_seed_and_token_index_and_below_one():
    from modelhive.engine.sampler import uniforms

    seeded = [item(SamplingParams(temperature=1.0, seed=s), f"s{s}", num_generated=k)
              for s in (0, 1, 2**64 - 1) for k in (0, 1, 2)]
    free = [item(SamplingParams(temperature=1.0), f"f{i}") for i in range(500)]
    u = uniforms(seeded + free, torch.Generator().manual_seed(4))
    assert u.dtype == np.float32 and ((u >= 0) & (u < 1)).all()
    assert len(set(u[:9].tolist())) == 9  # every (seed, index) its own
    assert uniforms(seeded[::-1])[::-1].tolist() == u[:9].tolist()  # whatever else is there
    assert uniforms(seeded[:1], ahead=1).tolist() == uniforms(seeded[1:2]).tolist()
    again = uniforms(seeded + free, torch.Generator().manual_seed(4))
    assert again.tolist() == u.tolist()
    assert 0.45 < float(u[9:].mean()) < 0.55


def test_cpu_top_p_from_candidates_and_the_full_sort_agree_with_one_row_at_a_time():
    """On the CPU, rows whose nucleus lies in their top candidates skip the full sort; flat
    rows (nucleus wider than the candidates) take it; a row without top-p is left alone."""
    from modelhive.engine.sampler import TOP_P_CANDIDATES, _top_p_from_candidates

    torch.manual_seed(8)
    vocab = 4 * TOP_P_CANDIDATES
    x = torch.randn(6, vocab)
    x[:3] *= 8  # peaked: the nucleus is a few tokens
    x[3:] *= 0.1  # flat: 90 % of the mass needs most of the vocabulary
    top_p = [0.9, 0.5, 1.0, 0.9, 0.95, 1.0]
    limits = [p if p < 1.0 else float("inf") for p in top_p]
    assert _top_p_from_candidates(x.clone(), limits) == [3, 4]
    got = _filter_rows(x.clone(), [0] * 6, top_p, [0.0] * 6)
    for r in range(6):
        want = _reference_filter(x[r], 0, top_p[r], 0.0)
        assert torch.equal(torch.isfinite(got[r]), torch.isfinite(want)), r
    assert torch.isfinite(got[2]).all() and torch.isfinite(got[5]).all()


def test_top_p_keeps_every_token_tied_at_the_cut():
    """A token is kept when the tokens strictly more probable than it hold at most top_p, so
    ties at the cut are all kept (the Triton draw's definition too), on either top-p path."""
    from modelhive.engine.sampler import _top_p_by_sort

    x = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0], [1.0, 3.0, 1.0, 1.0, 1.0]])
    # row 0: 0.45 before the tied tokens, 0.94 before the last; row 1: 0.72 before the ties
    by_sort = x.clone()
    _top_p_by_sort(by_sort, [0.5, 0.6])
    by_candidates = _filter_rows(x.clone(), [0, 0], [0.5, 0.6], [0.0, 0.0])
    for got in (by_sort, by_candidates):
        assert torch.isfinite(got).tolist() == [[True, True, True, True, False],
                                                [False, True, False, False, False]]
    kept = _filter_rows(x.clone(), [0, 0], [0.5, 0.8], [0.0, 0.0])
    assert torch.isfinite(kept[1]).all()


def test_sequence_history_is_incremental_and_its_views_stay_put():
    from modelhive.engine.sequence import Sequence

    seq = Sequence("s", "r", 0, "m", [5, 6, 7], SamplingParams(repetition_penalty=1.2), 0)
    first = seq.history()
    assert first.dtype == np.int64 and first.tolist() == [5, 6, 7]
    views = []
    for t in range(200):  # past the first buffer: it grows
        seq.output_token_ids.append(t)
        views.append(seq.history())
        assert views[-1].tolist() == list(seq.tokens(0, seq.num_tokens))
    assert first.tolist() == [5, 6, 7] and views[9].tolist() == [5, 6, 7, *range(10)]
    seq.output_token_ids.extend([900, 901, 902])  # several tokens between two calls
    assert seq.history().tolist() == [5, 6, 7, *range(200), 900, 901, 902]
    assert views[-1].tolist() == [5, 6, 7, *range(200)]
    fresh = Sequence("t", "r", 0, "m", [5], SamplingParams(repetition_penalty=1.2), 0)
    fresh.output_token_ids.append(8)  # the first call after an output token: prompt and token
    assert fresh.history().tolist() == [5, 8]


def test_penalties_ignore_ids_outside_the_vocabulary_and_take_arrays():
    logits = torch.randn(2, 16)
    p = SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.25,
                       presence_penalty=0.5)
    hist = (3, 3, 20, 7, -1, 7, 7, 16)  # 20, -1, 16: not in a 16-word vocabulary
    rows = [item(p, "a", history=hist, num_prompt=2), item(p, "b", history=np.array(hist), num_prompt=2)]
    got = penalised(logits, rows)
    clean = (3, 3, 7, 7, 7)
    for r in range(2):
        want = _reference_penalties(logits[r], item(p, "c", history=clean, num_prompt=2))
        torch.testing.assert_close(got[r], want)


def test_pending_tokens_count_as_generated_history():
    """``choose(..., pending=)`` (a step launched ahead of the host, ``runner/decode_ahead.py``)
    penalises as if each row's pending tokens ended its history: the same tokens and the same
    penalised logits as with the longer histories, drawn and greedy rows alike."""
    rng = np.random.default_rng(4)
    vocab, n = 60, 12
    logits = torch.randn(n, vocab) * 2
    items = _mixed_batch(rng, vocab, n)
    pending = torch.from_numpy(rng.integers(0, vocab, (n, 2)))
    longer = [item(it.params, it.seq_id, it.num_generated,
                   (*it.history, *pending[r].tolist()) if it.history else (), 10)
              for r, it in enumerate(items)]
    got = penalised(logits, items, pending)
    want = penalised(logits, longer)
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, logits)
    assert choose(logits.clone(), items, ahead=2, pending=pending).tolist() == \
        choose(logits.clone(), longer, ahead=2).tolist()


def test_penalties_in_groups_of_rows_equal_all_rows_at_once(monkeypatch):
    """Rows whose histories exceed ``estimates.PENALTY_GROUP_ENTRIES`` together go in several groups
    (a longer history alone): the same penalised logits as one group, pending tokens too."""
    from modelhive.planner import estimates

    rng = np.random.default_rng(5)
    logits = torch.randn(12, 80) * 2
    items = _mixed_batch(rng, 80, 12)
    pending = torch.from_numpy(rng.integers(0, 80, (12, 1)))
    whole = penalised(logits, items, pending)
    for cap in (25, 65):  # each 30-token history alone; two in a group, then one
        monkeypatch.setattr(estimates, "PENALTY_GROUP_ENTRIES", cap)
        torch.testing.assert_close(penalised(logits, items, pending), whole, rtol=0, atol=0)
