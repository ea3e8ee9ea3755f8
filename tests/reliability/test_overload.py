"""Item 3: 10x more concurrent requests than the server can hold (real subprocess, tiny presets).

Capacity = per model (max_num_seqs running + max_queue waiting) = 2 x (2 + 4) = 12 requests; each
wave sends 120 at once (half streaming, both models, chat and completions). Every request either
completes (200, all its tokens, [DONE] for streams) or is refused before it starts with 429 (a
model's queue is full) or 503 (the server is full), OpenAI's error shape and a Retry-After header;
none runs past DEADLINE_S. The server's RSS is sampled after a warm-up wave and after the last one.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time

import httpx

from tests.reliability.conftest import assert_openai_error, rss_bytes, wait_pool_free
from tests.server.conftest import start_server

CONFIG = """\
memory: 128MiB
device: cpu
models:
  - name: tiny-llama
    source: preset:tiny-llama
    max_model_len: 256
    max_num_seqs: 2
    max_queue: 4
  - name: tiny-qwen2
    source: preset:tiny-qwen2
    max_model_len: 256
    max_num_seqs: 2
    max_queue: 4
"""
MODELS = ("tiny-llama", "tiny-qwen2")
CAPACITY = 2 * (2 + 4)
CONCURRENT = 10 * CAPACITY
WAVES = 3
MAX_TOKENS = 48
DEADLINE_S = 90
#: RSS may grow by at most this much from the warm-up wave to the end (bytes)
RSS_GROWTH_LIMIT = 64 * 2**20


async def one_request(client: httpx.AsyncClient, i: int) -> tuple[int, float, str]:
    """Returns (status, seconds, problem or ''), checking whatever came back."""
    model = MODELS[i % 2]
    stream = i % 4 >= 2
    if i % 3 == 0:
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": f"overload {i}"}]}
    else:
        path, body = "/v1/completions", {"prompt": f"overload {i}"}
    body.update(model=model, max_tokens=MAX_TOKENS, ignore_eos=True, stream=stream)
    started = time.monotonic()
    async with client.stream("POST", path, json=body) as response:
        data = await response.aread()
        status = response.status_code
        elapsed = time.monotonic() - started
        if status in (429, 503):
            retry_after = response.headers.get("retry-after", "")
            if not retry_after.isdigit() or int(retry_after) < 1:
                return status, elapsed, f"{status} without a usable Retry-After: {retry_after!r}"
            response.json = lambda: json.loads(data)  # type: ignore[method-assign]
            assert_openai_error(response, status)
            return status, elapsed, ""
        if status != 200:
            return status, elapsed, data[:300].decode(errors="replace")
        if stream:
            events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
            if events[-1] != "[DONE]" or any('"error"' in e for e in events):
                return status, elapsed, f"stream ended badly: {events[-2:]}"
            return status, elapsed, ""
        usage = json.loads(data)["usage"]
        if usage["completion_tokens"] != MAX_TOKENS:
            return status, elapsed, f"only {usage['completion_tokens']} tokens"
        return status, elapsed, ""


async def wave(base_url: str, count: int) -> list[tuple[int, float, str]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=base_url, timeout=DEADLINE_S, limits=limits) as client:
        jobs = [asyncio.wait_for(one_request(client, i), DEADLINE_S) for i in range(count)]
        return await asyncio.gather(*jobs)


def test_ten_times_capacity_is_completed_or_refused_with_retry_after(tmp_path):
    (tmp_path / "hive.yaml").write_text(CONFIG)
    srv = start_server(tmp_path, str(tmp_path / "hive.yaml"), use_config=False)
    try:
        started = time.monotonic()
        results = asyncio.run(wave(srv.url(), CONCURRENT))  # warm-up wave (counted too)
        wait_pool_free(srv.url())
        rss_before = rss_bytes(srv.proc.pid)
        for _ in range(WAVES - 1):
            results += asyncio.run(wave(srv.url(), CONCURRENT))
            wait_pool_free(srv.url())
        rss_after = rss_bytes(srv.proc.pid)
        elapsed = time.monotonic() - started
        statuses = collections.Counter(status for status, _, _ in results)
        slowest = max(seconds for _, seconds, _ in results)
        print(f"\noverload: {len(results)} requests ({CONCURRENT} at once x {WAVES}, capacity "
              f"{CAPACITY}) in {elapsed:.1f} s: {dict(statuses)}; slowest {slowest:.1f} s; "
              f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")
        problems = [p for _, _, p in results if p]
        assert not problems, problems[:10]
        assert set(statuses) <= {200, 429, 503}, statuses
        assert statuses[200] >= CAPACITY  # at least what fits was served...
        assert statuses[429] + statuses[503] >= CONCURRENT  # ...and overload was refused, not queued
        assert slowest < DEADLINE_S
        assert rss_after - rss_before < RSS_GROWTH_LIMIT
        assert httpx.get(srv.url() + "/health").status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
