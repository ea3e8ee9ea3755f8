"""The load generator: send a workload's requests over HTTP on schedule and time every token.

Each request is ``POST /v1/completions`` with ``stream: true`` (usage included), ``ignore_eos``
and greedy sampling, sent by one asyncio task at its planned time. Outcomes:

- ``completed``: the stream ended with ``[DONE]`` and a ``stop``/``length`` finish reason.
- ``rejected``: HTTP 429 (the model's queue is full) or 503 (the server is at capacity). With
  ``honour_retry_after`` the request waits ``Retry-After`` seconds and tries again (at most
  ``max_retries`` times, never past the time limit); only the last answer counts.
- ``failed``: anything else (another HTTP status, an error event in the stream, a broken
  connection, a stream still open at the drain deadline). A healthy server has none.

No request is sent after ``time_limit_s``; those left are ``not_sent``. Requests in flight then
get ``drain_timeout_s`` more to finish. ``/metrics`` is polled every ``poll_interval_s`` for the
pool's occupancy, and read before and after for the preemption counters.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import httpx

from modelhive.bench.load.occupancy import PREEMPTIONS, Occupancy, scrape
from modelhive.bench.load.patterns import PlannedRequest, Workload, build_requests


@dataclass
class RequestResult:
    """What happened to one request; times in seconds."""

    index: int
    model: str
    outcome: str = "failed"  # completed | rejected | failed
    status: int | None = None  # HTTP status of the last attempt
    sent_at: float = 0.0  # since the run started (the first attempt)
    finished_at: float | None = None  # since the run started: last byte, rejection or failure
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    retries: int = 0
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class BenchRun:
    base_url: str
    models: tuple[str, ...]
    results: list[RequestResult]
    not_sent: list[PlannedRequest]
    duration_s: float
    preemptions: dict[str, int]
    occupancy: Occupancy


async def list_models(base_url: str, api_key: str | None = None) -> list[str]:
    """The model names ``GET /v1/models`` lists."""
    async with httpx.AsyncClient(headers=_headers(api_key), timeout=30) as client:
        response = await client.get(base_url + "/v1/models")
        response.raise_for_status()
        return [card["id"] for card in response.json()["data"]]


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def request_body(planned: PlannedRequest) -> dict:
    return {"model": planned.model, "prompt": planned.prompt, "max_tokens": planned.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def _stream_one(client: httpx.AsyncClient, url: str, planned: PlannedRequest,
                      result: RequestResult, deadline: float,
                      honour_retry_after: bool, max_retries: int) -> None:
    body = request_body(planned)
    while True:
        sent = time.perf_counter()
        async with client.stream("POST", url, json=body) as response:
            result.status = response.status_code
            if response.status_code in (429, 503):
                await response.aread()
                wait = _retry_after(response)
                if (honour_retry_after and result.retries < max_retries
                        and time.perf_counter() + wait < deadline):
                    result.retries += 1
                    await asyncio.sleep(wait)
                    continue
                result.outcome = "rejected"
                return
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return
            last = None
            chunks = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {event['error'].get('message', event)}"
                    return
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", ()):
                    now = time.perf_counter()
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                    chunks += 1
                    if last is None:
                        result.ttft = now - sent
                    else:
                        result.itls.append(now - last)
                    last = now
            else:
                result.error = "the stream ended without [DONE]"
                return
            if last is None:
                result.error = "no token was streamed"
                return
            result.e2e = last - sent
            if not result.output_tokens:
                result.output_tokens = chunks
            if result.finish_reason in ("stop", "length"):
                result.outcome = "completed"
            else:
                result.error = f"finish_reason {result.finish_reason!r}"
            return


async def _one(client: httpx.AsyncClient, url: str, planned: PlannedRequest, result: RequestResult,
               t0: float, deadline: float, honour_retry_after: bool, max_retries: int) -> None:
    try:
        await _stream_one(client, url, planned, result, deadline, honour_retry_after,
                          max_retries)
    except asyncio.CancelledError:
        result.outcome = "failed"
        result.error = "still streaming at the drain deadline"
        raise
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        result.outcome = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.finished_at = time.perf_counter() - t0


async def _preemption_counts(client: httpx.AsyncClient, base_url: str) -> dict[str, int]:
    metrics = await scrape(client, base_url)
    return {m: int(v) for m, v in metrics.get(PREEMPTIONS, {}).items()}


async def run_benchmark(base_url: str, workload: Workload, *, time_limit_s: float = math.inf,
                        drain_timeout_s: float = 120.0, honour_retry_after: bool = False,
                        max_retries: int = 3, poll_interval_s: float = 0.1,
                        api_key: str | None = None) -> BenchRun:
    """Run ``workload`` against the server at ``base_url``; see the module docstring."""
    planned = build_requests(workload)
    base_url = base_url.rstrip("/")
    url = base_url + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(30.0, read=None)  # a queued stream may wait long for its first byte
    async with httpx.AsyncClient(headers=_headers(api_key), limits=limits, timeout=timeout) as client, \
            httpx.AsyncClient(headers=_headers(api_key), timeout=10) as metrics_client:
        before = await _preemption_counts(metrics_client, base_url)
        occupancy = Occupancy(poll_interval_s)
        stop = asyncio.Event()
        t0 = time.perf_counter()
        deadline = t0 + time_limit_s
        poller = asyncio.create_task(occupancy.poll(metrics_client, base_url, t0, stop))
        results: list[RequestResult] = []
        tasks: list[asyncio.Task] = []
        not_sent: list[PlannedRequest] = []
        for i, p in enumerate(planned):
            delay = t0 + p.send_at - time.perf_counter()
            if t0 + p.send_at >= deadline:
                not_sent = planned[i:]
                break
            if delay > 0:
                await asyncio.sleep(delay)
            result = RequestResult(p.index, p.model, sent_at=time.perf_counter() - t0)
            results.append(result)
            tasks.append(asyncio.create_task(_one(client, url, p, result, t0, deadline,
                                                  honour_retry_after, max_retries)))
        if tasks:
            # in-flight requests get drain_timeout_s past the time limit (or past the last send)
            drain_until = (deadline if math.isfinite(time_limit_s) else time.perf_counter())
            _, pending = await asyncio.wait(
                tasks, timeout=max(0.0, drain_until + drain_timeout_s - time.perf_counter()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        duration = max([r.finished_at or r.sent_at for r in results], default=0.0)
        stop.set()
        await poller
        after = await _preemption_counts(metrics_client, base_url)
    models = tuple(dict.fromkeys(workload.models))
    preemptions = {m: after.get(m, 0) - before.get(m, 0) for m in models}
    return BenchRun(base_url, models, results, not_sent, duration, preemptions, occupancy)

