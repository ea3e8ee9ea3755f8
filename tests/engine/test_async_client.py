"""AsyncEngine's hand-off to the event loop (CPU, tiny presets): a step's deltas reach the loop in
one wake-up, and a consumer that falls behind reads what piled up in one batch, in order, with
the same tokens as an unloaded greedy run."""

from __future__ import annotations

import asyncio
import time

from modelhive import Hive, SamplingParams
from modelhive.engine import client as client_module
from modelhive.engine.client import AsyncEngine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _wait_idle(client: AsyncEngine, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.call(lambda engine: engine.has_work):
        assert time.monotonic() < deadline, "the engine did not finish"
        time.sleep(0.01)


def test_a_consumer_that_falls_behind_reads_the_piled_up_deltas_in_one_batch(roomy_hive: Hive):
    prompt = [5, 17, 42, 99, 7]
    expected = roomy_hive.generate("llama", [prompt], GREEDY)[0].token_ids
    client = AsyncEngine(roomy_hive.engine)
    client.start()

    async def main():
        await client.submit("llama", prompt, GREEDY, "late")
        _wait_idle(client)  # every token is generated before the consumer reads one
        await asyncio.sleep(0)  # the deliveries queued on this loop run
        return [batch async for batch in client.stream_batches("late")]

    try:
        batches = asyncio.run(main())
    finally:
        client.shutdown()
    assert len(batches) == 1
    deltas = batches[0]
    assert len(deltas) > 1  # one per step: 12 tokens took several steps
    assert [t for d in deltas for t in d.token_ids] == expected
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "length"


def test_one_wake_up_of_the_loop_per_step_for_all_streams(roomy_hive: Hive, monkeypatch):
    client = AsyncEngine(roomy_hive.engine)
    deliveries = []
    real = client_module._deliver

    def counting(items):
        deliveries.append(len(items))
        real(items)

    monkeypatch.setattr(client_module, "_deliver", counting)
    client.start()
    prompts = [[3 + i, 11, 29 + i] for i in range(8)]

    async def one(i: int) -> list[int]:
        return [t async for d in client.generate("llama", prompts[i], GREEDY, f"s{i}")
                for t in d.token_ids]

    async def main():
        return await asyncio.gather(*(one(i) for i in range(8)))

    steps0 = client.call(lambda engine: engine.num_steps)
    try:
        outputs = asyncio.run(main())
        steps = client.call(lambda engine: engine.num_steps) - steps0
    finally:
        client.shutdown()
    assert all(len(out) == GREEDY.max_tokens for out in outputs)
    assert sum(deliveries) >= 8 * GREEDY.max_tokens  # every token's delta went through them
    assert len(deliveries) <= steps  # at most one hand-off per step (aborts aside: none here)


def test_a_closed_consumer_loop_does_not_stop_the_engine(roomy_hive: Hive):
    """A request whose event loop closed before it finished (an ``asyncio.run`` that ended):
    its tokens cannot be delivered, so it is aborted and its blocks return; other requests run
    on."""
    prompt = [5, 17, 42, 99, 7]
    expected = roomy_hive.generate("llama", [prompt], GREEDY)[0].token_ids
    client = AsyncEngine(roomy_hive.engine)
    client.start()
    try:
        orphan_loop = asyncio.new_event_loop()
        long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
        orphan_loop.run_until_complete(client.submit("llama", prompt, long, "orphan"))
        orphan_loop.close()

        async def follow_up():
            async def tokens():
                return [t async for d in client.generate("llama", prompt, GREEDY, "after")
                        for t in d.token_ids]

            return await asyncio.wait_for(tokens(), timeout=60)

        assert asyncio.run(follow_up()) == expected
        _wait_idle(client)
        assert client.healthy
        client.call(lambda engine: engine.check_integrity())
        assert client.call(lambda engine: engine.allocator.num_used_blocks("llama")) == 0
    finally:
        client.shutdown()
