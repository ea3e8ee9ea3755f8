"""Clients that leave mid-stream give their KV blocks back; /metrics speaks vLLM's names."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.server.conftest import metric_values

MODELS = ("tiny-llama", "tiny-qwen2")
VLLM_NAMES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
              "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
              "vllm:e2e_request_latency_seconds_count")


def _per_model(values: dict, name: str) -> dict[str, float]:
    return {dict(labels)["model_name"]: v for (sample, labels), v in values.items()
            if sample == name}


def test_metrics_parse_with_vllm_names_and_model_label(server):
    client = server.client()
    for model in MODELS:  # some traffic so the histograms have samples
        list(client.completions.create(model=model, prompt="hi", max_tokens=4, stream=True,
                                       extra_body={"ignore_eos": True}))
    values = metric_values(server.url())
    for name in VLLM_NAMES:
        assert set(_per_model(values, name)) == set(MODELS), name
    assert all(v >= 1 for v in _per_model(values, "vllm:e2e_request_latency_seconds_count").values())
    assert all(v >= 3 for v in _per_model(values, "vllm:inter_token_latency_seconds_count").values())
    assert all(v >= 4 for v in _per_model(values, "vllm:generation_tokens_total").values())
    assert values[("modelhive:kv_blocks_total", ())] > 0
    assert set(_per_model(values, "modelhive:kv_blocks_used")) == set(MODELS)
    # the per-model port exposes the same process-wide registry
    assert ("modelhive:kv_blocks_total", ()) in metric_values(server.url(server.model_port))


async def _leave_mid_stream(base_url: str, i: int) -> int:
    """Open a long stream, read two events, close the connection; returns events read."""
    model = MODELS[i % 2]
    if i % 4 < 2:
        path, body = "/v1/completions", {"prompt": f"client {i}"}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": str(i)}]}
    body.update(model=model, max_tokens=400, stream=True, ignore_eos=True)
    events = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        async with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    if events == 2:
                        break  # leaving the block closes the connection mid-stream
    return events


def test_fifty_clients_disconnect_and_every_block_returns(server):
    async def run_all():
        return await asyncio.gather(*(_leave_mid_stream(server.url(), i) for i in range(50)))

    before = metric_values(server.url())
    assert all(n == 2 for n in asyncio.run(run_all()))
    deadline = time.monotonic() + 30
    while True:
        values = metric_values(server.url())
        used = _per_model(values, "modelhive:kv_blocks_used")
        running = _per_model(values, "vllm:num_requests_running")
        waiting = _per_model(values, "vllm:num_requests_waiting")
        if not any(used.values()) and not any(running.values()) and not any(waiting.values()):
            break
        assert time.monotonic() < deadline, f"blocks still used: {used}, running {running}"
        time.sleep(0.2)
    assert used == {m: 0 for m in MODELS}
    assert values[("modelhive:kv_blocks_free", ())] == values[("modelhive:kv_blocks_total", ())]
    # they were aborted, not run to the end: far fewer than 50 x 400 tokens were generated
    generated = sum(_per_model(values, "vllm:generation_tokens_total").values()) - sum(
        _per_model(before, "vllm:generation_tokens_total").values())
    assert generated < 50 * 400 / 2
    r = server.client().chat.completions.create(
        model="tiny-qwen2", messages=[{"role": "user", "content": "still there?"}], max_tokens=3)
    assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1


def test_non_streaming_client_that_leaves_is_aborted(server):
    before = sum(_per_model(metric_values(server.url()), "vllm:generation_tokens_total").values())
    with httpx.Client(base_url=server.url(), timeout=0.3) as client:
        try:
            client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "long",
                                                 "max_tokens": 500, "ignore_eos": True})
        except httpx.TimeoutException:
            pass
    deadline = time.monotonic() + 20
    while any(_per_model(metric_values(server.url()), "modelhive:kv_blocks_used").values()):
        assert time.monotonic() < deadline, "the abandoned request kept its blocks"
        time.sleep(0.2)
    after = sum(_per_model(metric_values(server.url()), "vllm:generation_tokens_total").values())
    assert 0 < after - before < 500  # stopped early, not run to max_tokens
