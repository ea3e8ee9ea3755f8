"""Many models, one pool, real traffic (CPU, tiny presets): a few hundred concurrent requests
over three models through the async engine, with a pool small enough to force cross-model
preemption and queues small enough to reject some. Every request either completes with the same
greedy tokens as an unloaded run or is rejected with 429/503; afterwards the pool is whole."""

from __future__ import annotations

import asyncio
import dataclasses
import random

from modelhive import Hive, SamplingParams
from modelhive.engine.client import AsyncEngine
from modelhive.errors import CapacityError
from tests.engine.conftest import THREE, budget_for_blocks


def workload(seed: int, count: int):
    rng = random.Random(seed)
    vocab = {"llama": 512, "qwen2": 1024, "gemma3": 1024}
    reqs = []
    for i in range(count):
        model = rng.choices(["llama", "qwen2", "gemma3"], weights=[6, 3, 1])[0]  # skewed
        prompt = [rng.randrange(3, vocab[model]) for _ in range(rng.randint(2, 48))]
        reqs.append((f"r{i}", model, prompt, rng.randint(1, 24), rng.random() * 0.5))
    return reqs


def test_few_hundred_requests_complete_exactly_or_are_rejected(roomy_hive: Hive):
    reqs = workload(seed=11, count=300)
    expected = {}
    for rid, model, prompt, max_tokens, _ in reqs:
        p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        expected[rid] = roomy_hive.generate(model, [prompt], p)[0].token_ids
    specs = [dataclasses.replace(s, max_queue=40) for s in THREE]
    tight = Hive(specs, device="cpu", memory=budget_for_blocks(specs, 30))
    client = AsyncEngine(tight.engine)
    client.start()

    async def one(rid, model, prompt, max_tokens, delay):
        await asyncio.sleep(delay)
        p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        try:
            tokens = []
            async for delta in client.generate(model, prompt, p, rid):
                tokens.extend(delta.token_ids)
                assert delta.error is None
            return rid, tokens
        except CapacityError as exc:
            assert exc.status in (429, 503)
            return rid, exc

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(*r) for r in reqs)), timeout=240)

    results = asyncio.run(main())
    rejected = [rid for rid, out in results if isinstance(out, CapacityError)]
    done = {rid: out for rid, out in results if not isinstance(out, CapacityError)}
    assert len(done) + len(rejected) == len(reqs)
    assert len(done) >= len(reqs) // 3
    for rid, tokens in done.items():
        assert tokens == expected[rid], rid
    stats = client.call(lambda eng: (eng.scheduler.num_preemptions, eng.allocator.num_free_blocks,
                                     eng.pool.num_blocks, eng.has_work))
    client.call(lambda eng: eng.check_integrity())
    client.shutdown()
    preemptions, free, total, busy = stats
    assert sum(preemptions.values()) > 0 and len(rejected) > 0
    assert free == total and not busy
