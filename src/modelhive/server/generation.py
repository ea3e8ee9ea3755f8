"""Running one HTTP request's prompts through the engine: submit, merge delta streams, collect.

Shared by /v1/completions and /v1/chat/completions. A request has one or more prompts (completions
accepts a list), each with ``n`` completions; the response numbers choices ``prompt * n + index``.

Cancellation contract: leaving ``iterate_deltas`` early (the client went away, the handler task was
cancelled, an exception) closes every ``AsyncEngine.stream``, whose ``finally`` aborts the request
on the engine thread, so its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from modelhive.engine.output import CompletionDelta, TokenLogprob
from modelhive.sampling_params import SamplingParams
from modelhive.server.errors import APIError
from modelhive.server.metrics import RequestTimer
from modelhive.server.state import ServerState

T = TypeVar("T")


@dataclass
class Choice:
    """One completion, accumulated from its deltas (non-streaming responses)."""

    index: int
    #: the deltas' texts, joined once by ``text`` (``+=`` on a growing string copies all of it
    #: per token, on the server's event loop)
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    #: the prompt's tokens 1.. when they were scored (``SamplingParams.prompt_logprobs``)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def text(self) -> str:
        return "".join(self.parts)


async def submit_prompts(state: ServerState, model: str, prompts: list[list[int]],
                         params: list[SamplingParams], request_id: str,
                         priority: int | None = None) -> list[str]:
    """Submit every prompt; if one is refused, abort the ones already queued and re-raise."""
    engine = state.async_engine
    rids: list[str] = []
    try:
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            await engine.submit(model, ids, p, rid, priority)
            rids.append(rid)
    except BaseException:
        for rid in rids:  # draining the stream aborts the request and forgets it
            asyncio.get_running_loop().create_task(_discard(state, rid))
        raise
    return rids


async def _discard(state: ServerState, rid: str) -> None:
    stream = state.async_engine.stream(rid)
    with contextlib.suppress(StopAsyncIteration):
        await stream.__anext__()  # started, so closing it runs its abort-on-exit
    await stream.aclose()


def generation_error(state: ServerState, delta: CompletionDelta) -> APIError:
    if not state.async_engine.healthy:
        return APIError(503, f"The engine stopped while generating ({delta.error}); restart the "
                        "server", "service_unavailable_error", code="service_unavailable")
    return APIError(500, f"Generation failed: {delta.error or delta.finish_reason}",
                    "internal_server_error", code="generation_failed")


async def iterate_deltas(state: ServerState, rids: list[str], timer: RequestTimer
                         ) -> AsyncIterator[list[tuple[int, CompletionDelta]]]:
    """Lists of (prompt index, delta) in arrival order, over every prompt of the request: what
    has arrived at each wake-up (``AsyncEngine.stream_batches``)."""
    engine = state.async_engine
    if len(rids) == 1:
        async with contextlib.aclosing(engine.stream_batches(rids[0])) as batches:
            async for batch in batches:
                for delta in batch:
                    timer.on_delta(delta, 0)
                yield [(0, delta) for delta in batch]
        return
    queue: asyncio.Queue[tuple[int, list[CompletionDelta] | None]] = asyncio.Queue()

    async def pump(prompt_index: int, rid: str) -> None:
        try:
            async with contextlib.aclosing(engine.stream_batches(rid)) as batches:
                async for batch in batches:
                    queue.put_nowait((prompt_index, batch))
        finally:
            queue.put_nowait((prompt_index, None))

    tasks = [asyncio.get_running_loop().create_task(pump(i, rid)) for i, rid in enumerate(rids)]
    try:
        remaining = len(tasks)
        while remaining:
            out: list[tuple[int, CompletionDelta]] = []
            item = await queue.get()
            while True:
                prompt_index, batch = item
                if batch is None:
                    remaining -= 1
                else:
                    for delta in batch:
                        timer.on_delta(delta, prompt_index)
                        out.append((prompt_index, delta))
                if queue.empty():
                    break
                item = queue.get_nowait()
            if out:
                yield out
    finally:
        for task in tasks:
            task.cancel()


async def stream_choices(state: ServerState, rids: list[str], n: int, timer: RequestTimer
                         ) -> AsyncIterator[list[tuple[int, CompletionDelta]]]:
    """Lists of (choice index, delta), each delta worth sending, in order (``iterate_deltas``'
    batches); raises APIError if the engine failed, after the deltas before the failure."""
    async with contextlib.aclosing(iterate_deltas(state, rids, timer)) as batches:
        async for batch in batches:
            out = []
            for prompt_index, delta in batch:
                if delta.finish_reason == "error":
                    if out:
                        yield out
                    raise generation_error(state, delta)
                if delta.text or delta.finish_reason is not None or delta.logprobs \
                        or delta.prompt_logprobs:
                    out.append((prompt_index * n + delta.index, delta))
            if out:
                yield out
    timer.finish()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def collect(state: ServerState, rids: list[str], n: int,
                  timer: RequestTimer) -> list[Choice]:
    """Every choice of the request, complete; raises APIError if the engine failed one."""
    choices = [Choice(i) for i in range(len(rids) * n)]
    async with contextlib.aclosing(stream_choices(state, rids, n, timer)) as batches:
        async for batch in batches:
            for index, delta in batch:
                choice = choices[index]
                choice.parts.append(delta.text)
                choice.num_tokens = delta.num_output_tokens
                if delta.logprobs:
                    choice.logprobs.extend(delta.logprobs)
                if delta.prompt_logprobs:
                    choice.prompt_logprobs = delta.prompt_logprobs
                if delta.finish_reason is not None:
                    choice.finish_reason = delta.finish_reason
    return choices


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it (its streams abort their requests).

    Streaming responses get this from Starlette; a non-streaming handler would otherwise keep
    generating for a client that is gone.
    """
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise APIError(499, "The client closed the connection", code="client_closed_request")
    return task.result()
