"""The runner's graph path (on CUDA: every step of at most ``graph_max_rows`` tokens replays one
graph, one row per token, prompt chunks included) gives the same tokens as eager steps. On CPU a
stand-in runs each replay as an eager forward over exactly the rows a graph would get (every row
its own one-token chunk at its position, sharing its sequence's block table), so what is tested
here is the orchestration: row layout, causal order inside a chunk, which logits row samples."""

from __future__ import annotations

import random

import pytest
import torch

from modelhive import Hive, SamplingParams
from modelhive.kernels import ops
from modelhive.runner.attn_metadata import SeqChunk, build_attention_metadata
from modelhive.runner.cuda_graphs import decode_lookahead
from modelhive.runner.decode_ahead import DecodeAhead
from tests.engine.conftest import THREE, budget_for_blocks


class EagerRows:
    """Stands in for ``runner.cuda_graphs.DecodeGraphs`` (``fits`` / ``replay``, and the
    multi-step ``fits_steps`` / ``replay_steps`` with ``steps`` > 1)."""

    def __init__(self, runner, max_rows: int = 16, steps: int = 1):
        self.runner = runner
        self.max_rows = self.max_batch = max_rows
        self.tokens_per_block = runner.layout.tokens_per_block
        self.steps = steps
        self.calls = 0
        self.prompt_rows = 0  # rows that were not decodes (a chunk's tokens)

    def fits(self, rows):
        return len(rows) <= self.max_rows

    def fits_steps(self, rows):
        T, S = self.tokens_per_block, self.steps
        return S > 1 and self.fits(rows) and all(p + S <= len(t) * T for _, p, t in rows)

    def replay_steps(self, rows, input_ids):
        """``steps`` decode steps, each fed the previous one's greedy tokens a position on."""
        r, ids, out = self.runner, input_ids, []
        for k in range(self.steps):
            chunks = [SeqChunk(p + k, 1, table) for _, p, table in rows]
            meta = build_attention_metadata(chunks, r.layout.tokens_per_block, "cpu")
            ids = ops.argmax(r.model.compute_logits(r.model(ids, meta, r.kv_caches)))
            out.append(ids)
        return torch.stack(out)

    def replay(self, rows, input_ids=None):
        self.calls += 1
        r = self.runner
        tables = [table for _, _, table in rows]
        self.prompt_rows += sum(1 for i, t in enumerate(tables)
                                if (i and tables[i - 1] is t) or (i + 1 < len(tables)
                                                                  and tables[i + 1] is t))
        chunks = [SeqChunk(p, 1, table) for _, p, table in rows]
        meta = build_attention_metadata(chunks, r.layout.tokens_per_block, "cpu")
        ids = torch.tensor([tok for tok, _, _ in rows]) if input_ids is None else input_ids
        logits = r.model.compute_logits(r.model(ids, meta, r.kv_caches))
        return logits, ops.argmax(logits)


def staggered(hive: Hive, work, params, logprobs: list | None = None) -> list[list[int]]:
    """Submit one request per step (so prompt chunks share steps with running decodes); with
    ``logprobs`` (a list), append each request's (token, logprob, alternatives) there."""
    if isinstance(params, SamplingParams):
        params = [params] * len(work)
    engine = hive.engine
    pending = list(enumerate(work))
    ids: dict[str, int] = {}
    out: dict[int, list[int]] = {i: [] for i in range(len(work))}
    lps: dict[int, list] = {i: [] for i in range(len(work))}
    while pending or engine.has_work:
        if pending:
            i, (model, prompt) = pending.pop(0)
            ids[engine.add_request(model, prompt, params[i])] = i
        for delta in engine.step():
            out[ids[delta.request_id]].extend(delta.token_ids)
            lps[ids[delta.request_id]].extend(
                (t.token_id, t.logprob, tuple(a[0] for a in t.top)) for t in delta.logprobs or ())
        engine.check_integrity()
    if logprobs is not None:
        logprobs.extend(lps[i] for i in range(len(work)))
    return [out[i] for i in range(len(work))]


def test_graph_rows_match_eager_steps():
    rng = random.Random(5)
    work = [(m, [rng.randrange(3, 500) for _ in range(rng.randint(1, 9))])
            for m in ("llama", "qwen2", "gemma3") for _ in range(6)]
    work.insert(4, ("llama", [rng.randrange(3, 500) for _ in range(40)]))  # too long: eager
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    memory = budget_for_blocks(THREE, 200)
    expected = [r.token_ids for r in Hive(THREE, device="cpu", memory=memory)
                .generate_many(work, params)]
    hive = Hive(THREE, device="cpu", memory=memory)
    stand_ins = []
    for loaded in hive.engine.models.values():
        loaded.runner.decode_graphs = EagerRows(loaded.runner)
        stand_ins.append(loaded.runner.decode_graphs)
    assert staggered(hive, work, params) == expected
    assert all(s.calls > 0 and s.prompt_rows > 0 for s in stand_ins)


@pytest.mark.parametrize("steps", [1, 3])
def test_decode_ahead_matches_plain_steps(steps):
    """Decode steps launched one step ahead (fed the sampled tokens on the device; greedy and
    seeded sampling), with everything that must drop them: prompts joining, stop tokens at
    unpredictable points, models going idle, preemptions in a pool this small. ``steps`` 3:
    greedy batches launch three decode steps at once (multi-step graphs)."""
    rng = random.Random(11)
    work, params = [], []
    for i in range(24):
        model = ("llama", "qwen2", "gemma3")[i % 3]
        work.append((model, [rng.randrange(3, 500) for _ in range(rng.randint(1, 12))]))
        if i % 5 == 4:  # seeded sampling: drawn on the device ahead too, and must still match
            params.append(SamplingParams(max_tokens=rng.randint(5, 30), temperature=0.8, seed=i,
                                         ignore_eos=True))
        else:
            params.append(SamplingParams(max_tokens=rng.randint(5, 30), temperature=0.0,
                                         ignore_eos=True,
                                         stop_token_ids=[rng.randrange(3, 500) for _ in range(4)]))
    memory = budget_for_blocks(THREE, 16)
    expected = staggered(Hive(THREE, device="cpu", memory=memory), work, params)
    hive = Hive(THREE, device="cpu", memory=memory)
    hive.engine.scheduler.lookahead = decode_lookahead(steps)  # as ``capture_cuda_graphs``
    aheads = []
    for loaded in hive.engine.models.values():
        loaded.runner.decode_graphs = EagerRows(loaded.runner, steps=steps)
        loaded.runner.ahead = DecodeAhead(loaded.runner.decode_graphs, loaded.limits.max_model_len,
                                          loaded.runner.generator)
        aheads.append(loaded.runner.ahead)
    assert staggered(hive, work, params) == expected
    assert sum(hive.engine.scheduler.num_preemptions.values()) > 0
    assert all(a.used > 0 for a in aheads), [(a.launched, a.used) for a in aheads]
    assert sum(a.launched - a.taken for a in aheads) > 0  # some were dropped
    if steps > 1:
        assert all(a.multi_launched > 0 for a in aheads)


def test_decode_ahead_with_penalties_and_logprobs_matches_plain_steps():
    """Penalised requests (repetition, frequency, presence; greedy and seeded draws) and
    logprobs requests beside plain ones, their decode steps launched ahead: a launched step's
    penalties count the token it is fed, which no host history holds yet, and its logprobs
    come back with its tokens; the tokens and logprobs equal plain steps', through prompts
    joining, stop tokens and preemptions."""
    rng = random.Random(12)
    kinds = [dict(temperature=0.0, repetition_penalty=1.5),
             dict(temperature=0.0, frequency_penalty=0.8, presence_penalty=0.5),
             dict(temperature=0.9, seed=5, repetition_penalty=1.3, frequency_penalty=0.4),
             dict(temperature=0.0, logprobs=2),
             dict(temperature=0.7, seed=9, logprobs=0, presence_penalty=1.0),
             dict(temperature=0.0)]
    work, params = [], []
    for i in range(24):
        model = ("llama", "qwen2", "gemma3")[i % 3]
        work.append((model, [rng.randrange(3, 60) for _ in range(rng.randint(1, 12))]))
        params.append(SamplingParams(max_tokens=rng.randint(5, 30), ignore_eos=True,
                                     stop_token_ids=[rng.randrange(3, 500) for _ in range(2)],
                                     **kinds[i % len(kinds)]))
    memory = budget_for_blocks(THREE, 16)
    want_lps: list = []
    expected = staggered(Hive(THREE, device="cpu", memory=memory), work, params, want_lps)
    hive = Hive(THREE, device="cpu", memory=memory)
    hive.engine.scheduler.lookahead = decode_lookahead(3)
    aheads = []
    for loaded in hive.engine.models.values():
        loaded.runner.decode_graphs = EagerRows(loaded.runner, steps=3)
        loaded.runner.ahead = DecodeAhead(loaded.runner.decode_graphs, loaded.limits.max_model_len,
                                          loaded.runner.generator)
        aheads.append(loaded.runner.ahead)
    got_lps: list = []
    assert staggered(hive, work, params, got_lps) == expected
    for i, (got, want) in enumerate(zip(got_lps, want_lps, strict=True)):
        assert len(got) == len(want) == (len(expected[i]) if params[i].logprobs is not None
                                         else 0)
        for (t, lp, top), (wt, wlp, wtop) in zip(got, want, strict=True):
            assert t == wt and top == wtop and abs(lp - wlp) < 1e-5
    assert sum(hive.engine.scheduler.num_preemptions.values()) > 0
    assert all(a.taken > 0 for a in aheads), [(a.launched, a.taken) for a in aheads]
