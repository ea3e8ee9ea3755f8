"""The runner's short-chunk path (on CUDA: one decode-graph replay per token position) gives the
same tokens as eager steps. On CPU a stand-in runs each one-token-per-sequence replay eagerly, so
the orchestration (positions, KV order, which logits row samples) is what is tested here."""

from __future__ import annotations

import random

import torch

from modelhive import Hive, SamplingParams
from modelhive.runner.attn_metadata import SeqChunk, build_attention_metadata
from tests.engine.conftest import THREE, budget_for_blocks


class EagerReplays:
    """Stands in for runner.cuda_graphs.DecodeGraphs: never replays whole steps (``run`` is None),
    runs ``replay_one_token_each`` as an eager forward of one token per sequence."""

    def __init__(self, runner):
        self.runner = runner
        self.calls = 0

    def run(self, seqs):
        return None

    def fits(self, seqs):
        return True

    def replay_one_token_each(self, seqs):
        self.calls += 1
        r = self.runner
        chunks = [SeqChunk(s.num_cached, 1, s.block_table) for s in seqs]
        meta = build_attention_metadata(chunks, r.layout.tokens_per_block, "cpu")
        ids = torch.tensor([s.token_ids[0] for s in seqs])
        return r.model.compute_logits(r.model(ids, meta, r.kv_caches))


def test_short_chunks_by_one_token_replays_match_eager():
    rng = random.Random(5)
    work = [(m, [rng.randrange(3, 500) for _ in range(rng.randint(1, 4))])
            for m in ("llama", "qwen2", "gemma3") for _ in range(6)]
    work += [("llama", [rng.randrange(3, 500) for _ in range(20)])]  # a long one: eager steps
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    memory = budget_for_blocks(THREE, 200)
    expected = [r.token_ids for r in Hive(THREE, device="cpu", memory=memory)
                .generate_many(work, params)]
    hive = Hive(THREE, device="cpu", memory=memory)
    stand_ins = []
    for loaded in hive.engine.models.values():
        loaded.runner.decode_graphs = EagerReplays(loaded.runner)
        stand_ins.append(loaded.runner.decode_graphs)
    got = [r.token_ids for r in hive.generate_many(work, params, check_integrity=True)]
    assert got == expected
    assert all(s.calls > 0 for s in stand_ins)
