"""Item 7 (soak, `make soak`): 10,000 mixed requests over three tiny models on one server (CPU).

Mix: completions and chat, streaming and not, n=2, penalised drawn chats (frequency, presence,
repetition, top-p, seeded), completions with logprobs, /tokenize, and a planned 5 % of invalid
requests (400 expected). 32 clients at a time. Afterwards: the pool is whole, RSS grew < 5 % from the end of
a 1,000-request warm-up to the end, and nothing failed except planned rejections (400 for the
invalid ones; 429/503 with Retry-After would count as planned too). Figures are printed.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time

import httpx
import pytest

from tests.reliability.conftest import rss_bytes, wait_pool_free
from tests.server.conftest import start_server

pytestmark = pytest.mark.soak

CONFIG = """\
memory: 192MiB
device: cpu
models:
  - name: tiny-llama
    source: preset:tiny-llama
    max_model_len: 256
    max_num_seqs: 16
    max_queue: 128
  - name: tiny-qwen2
    source: preset:tiny-qwen2
    max_model_len: 256
    max_num_seqs: 16
    max_queue: 128
  - name: tiny-gemma3
    source: preset:tiny-gemma3
    max_model_len: 256
    max_num_seqs: 16
    max_queue: 128
"""
MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")
TOTAL = 10_000
WARMUP = 1_000
CONCURRENCY = 32
REQUEST_TIMEOUT_S = 60
RUN_LIMIT_S = 1800


def make_request(i: int, rng: random.Random) -> tuple[str, str, dict, int]:
    """(kind, path, body, expected status)."""
    model = MODELS[i % 3]
    max_tokens = rng.randint(1, 24)
    kind = rng.choices(["completion", "chat", "stream-completion", "stream-chat", "n2",
                        "penalised", "logprobs", "tokenize", "invalid"],
                       weights=[22, 22, 13, 13, 7, 5, 5, 8, 5])[0]
    prompt = " ".join(rng.choice(["bees", "hive", "honey", "queen", "wax", "pollen"])
                      for _ in range(rng.randint(1, 30)))
    chat = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens}
    completion = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    if kind == "completion":
        return kind, "/v1/completions", completion, 200
    if kind == "chat":
        return kind, "/v1/chat/completions", chat, 200
    if kind == "stream-completion":
        return kind, "/v1/completions", {**completion, "stream": True}, 200
    if kind == "stream-chat":
        return kind, "/v1/chat/completions", {**chat, "stream": True,
                                               "stream_options": {"include_usage": True}}, 200
    if kind == "n2":
        return kind, "/v1/completions", {**completion, "n": 2, "seed": i}, 200
    if kind == "penalised":
        return kind, "/v1/chat/completions", {
            **chat, "temperature": 0.8, "top_p": 0.9, "seed": i, "frequency_penalty": 0.5,
            "presence_penalty": 0.3, "repetition_penalty": 1.1}, 200
    if kind == "logprobs":
        return kind, "/v1/completions", {**completion, "temperature": 0, "logprobs": 2}, 200
    if kind == "tokenize":
        return kind, "/tokenize", {"model": model, "prompt": prompt}, 200
    return kind, "/v1/completions", {**completion, "temperature": -1}, 400


async def send(client: httpx.AsyncClient, i: int, rng: random.Random) -> tuple[str, int, str]:
    kind, path, body, expected = make_request(i, rng)
    async with client.stream("POST", path, json=body) as response:
        data = await response.aread()
    status = response.status_code
    if status in (429, 503) and response.headers.get("retry-after", "").isdigit():
        return kind, status, ""  # a planned rejection
    if status != expected:
        return kind, status, f"{kind}: {status} {data[:200]!r}"
    if status == 200 and body.get("stream"):
        text = data.decode()
        if not text.rstrip().endswith("data: [DONE]") or '"error"' in text:
            return kind, status, f"{kind}: bad stream end {text[-200:]!r}"
    elif status == 200 and path != "/tokenize":
        choices = json.loads(data)["choices"]
        if len(choices) != body.get("n", 1) or any(c["finish_reason"] is None for c in choices):
            return kind, status, f"{kind}: bad choices {choices!r}"[:300]
        if "logprobs" in body and any(
                len(c["logprobs"]["top_logprobs"]) != len(c["logprobs"]["tokens"])
                or not c["logprobs"]["tokens"] for c in choices):
            return kind, status, f"{kind}: bad logprobs {choices!r}"[:300]
    return kind, status, ""


async def run_requests(base_url: str, start: int, stop: int) -> list[tuple[str, int, str]]:
    results: list[tuple[str, int, str]] = []
    next_index = start
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S,
                                 limits=limits) as client:
        async def worker() -> None:
            nonlocal next_index
            while next_index < stop:
                i = next_index
                next_index += 1
                results.append(await asyncio.wait_for(send(client, i, random.Random(i)),
                                                       REQUEST_TIMEOUT_S))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


def test_soak_ten_thousand_mixed_requests(tmp_path):
    (tmp_path / "hive.yaml").write_text(CONFIG)
    srv = start_server(tmp_path, str(tmp_path / "hive.yaml"), use_config=False)
    try:
        rss_start = rss_bytes(srv.proc.pid)
        started = time.monotonic()
        results = asyncio.run(asyncio.wait_for(run_requests(srv.url(), 0, WARMUP), RUN_LIMIT_S))
        wait_pool_free(srv.url())
        rss_warm = rss_bytes(srv.proc.pid)
        results += asyncio.run(asyncio.wait_for(run_requests(srv.url(), WARMUP, TOTAL),
                                                RUN_LIMIT_S))
        elapsed = time.monotonic() - started
        figures = wait_pool_free(srv.url())
        rss_end = rss_bytes(srv.proc.pid)
        statuses = collections.Counter(status for _, status, _ in results)
        kinds = collections.Counter(kind for kind, _, _ in results)
        errors = [problem for _, _, problem in results if problem]
        growth = (rss_end - rss_warm) / rss_warm
        print(f"\nsoak: {len(results)} requests in {elapsed:.0f} s "
              f"({len(results) / elapsed:.0f} req/s, {CONCURRENCY} clients, 3 models); "
              f"kinds {dict(kinds)}; statuses {dict(statuses)}; unplanned errors {len(errors)}; "
              f"RSS start {rss_start / 2**20:.1f} MiB, after warm-up {rss_warm / 2**20:.1f} MiB, "
              f"end {rss_end / 2**20:.1f} MiB (growth {100 * growth:+.2f} %); pool {figures}")
        assert len(results) == TOTAL
        assert not errors, errors[:10]
        assert growth < 0.05
        assert httpx.get(srv.url() + "/health").status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
