"""AsyncEngine: the engine's step loop on its own thread, with an asyncio API for the server.

Process layout: the engine runs in the HTTP process, on one dedicated thread that owns the
``Engine`` (nothing else touches it). The event loop talks to it through a command queue
(submit / abort) and receives ``CompletionDelta``s through per-request asyncio queues. Tensor work
releases the GIL, so HTTP parsing and SSE writing overlap the forward passes; see
docs/process-layout.md for the measurement behind this choice.

Contract:
- ``submit(...)`` validates on the engine thread and raises the engine's ``ModelhiveError`` in the
  caller (so the HTTP layer can answer 400/404/429 before streaming starts).
- ``stream_batches(request_id)`` yields lists of deltas (all that arrived since the consumer last
  looked; a step's deltas reach the event loop in one wake-up) until every completion of the
  request has finished; ``stream(request_id)`` yields the same deltas one at a time.
- ``abort(request_id)`` (also called when a stream's consumer goes away) finishes the request's
  sequences and returns their KV blocks to the pool.
- If the loop thread dies, ``healthy`` is False and every open stream ends with an error delta.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from modelhive.engine.engine import Engine
from modelhive.engine.output import CompletionDelta
from modelhive.sampling_params import SamplingParams

log = logging.getLogger("modelhive.client")


@dataclass
class ModelStats:
    running: int = 0
    waiting: int = 0
    blocks_used: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    preemptions_total: int = 0


@dataclass
class EngineStats:
    """Snapshot refreshed by the loop after each step; read by /metrics without locking."""

    models: dict[str, ModelStats] = field(default_factory=dict)
    free_blocks: int = 0
    total_blocks: int = 0
    steps: int = 0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    remaining: int  # completions not finished yet


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name="modelhive-engine", daemon=True)
        self._stopping = threading.Event()
        self.error: str | None = None
        self.stats = EngineStats(total_blocks=engine.pool.num_blocks)
        self._refresh_stats()

    # ------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop after in-flight requests finish (or ``timeout`` seconds pass)."""
        self._stopping.set()
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------- API
    async def submit(self, model: str, prompt: str | list[int], params: SamplingParams,
                     request_id: str, priority: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        stream = _Stream(loop, asyncio.Queue(), params.n)
        self._inbox.put(("add", (model, prompt, params, request_id, priority, stream), (loop, fut)))
        await fut  # raises the engine's validation error, if any

    async def stream_batches(self, request_id: str) -> AsyncIterator[list[CompletionDelta]]:
        """The request's deltas, every one that has arrived at each wake-up: one delta a step
        while the event loop keeps up, several (in order) once it falls behind, so a loaded
        server pays its per-wake-up and per-write costs once for several tokens."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        queue = stream.queue
        try:
            while stream.remaining > 0:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                stream.remaining -= sum(d.finish_reason is not None for d in batch)
                yield batch
        finally:
            if stream.remaining > 0:  # consumer left early (client disconnected): free its KV
                self.abort(request_id)
            self._streams.pop(request_id, None)

    async def stream(self, request_id: str) -> AsyncIterator[CompletionDelta]:
        """``stream_batches``, one delta at a time."""
        async with aclosing(self.stream_batches(request_id)) as batches:
            async for batch in batches:
                for delta in batch:
                    yield delta

    async def generate(self, model: str, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[CompletionDelta]:
        await self.submit(model, prompt, params, request_id)
        async for delta in self.stream(request_id):
            yield delta

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    def call(self, fn, *args) -> Any:
        """Run ``fn(engine, *args)`` on the engine thread and wait for its result (tests, admin)."""
        done = threading.Event()
        box: dict[str, Any] = {}
        self._inbox.put(("call", (fn, args, box), done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    # ------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_work
                if self._stopping.is_set() and block:
                    break
                self._drain(block)
                if self.engine.has_work:
                    self._dispatch(self.engine.step())
                # also after commands alone: an abort that empties the engine frees blocks
                # without a step, and /metrics must see them back in the pool
                self._refresh_stats()
        except BaseException as exc:  # the loop itself broke: fail every open stream
            log.exception("engine loop died")
            self.error = f"{type(exc).__name__}: {exc}"
            for rid, stream in list(self._streams.items()):
                for i in range(stream.remaining):
                    d = CompletionDelta(rid, i, (), "", "error", None, 0, 0, self.error)
                    _call_soon(stream.loop, stream.queue.put_nowait, d)

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload, reply) -> None:
        if kind == "add":
            model, prompt, params, request_id, priority, stream = payload
            loop, fut = reply
            try:
                self.engine.add_request(model, prompt, params, request_id, priority)
            except Exception as exc:
                _call_soon(loop, _settle, fut, exc)
                return
            self._streams[request_id] = stream
            if not _call_soon(loop, _settle, fut, None):  # the submitter's loop is gone
                self._streams.pop(request_id, None)
                self.engine.abort(request_id)
        elif kind == "abort":
            self._dispatch(self.engine.abort(payload))
        elif kind == "call":
            fn, args, box = payload
            try:
                box["result"] = fn(self.engine, *args)
            except Exception as exc:
                box["error"] = exc
            reply.set()

    def _dispatch(self, deltas: list[CompletionDelta]) -> None:
        """Hand a step's deltas to their streams' event loops: one thread-safe call per loop
        and step (each call wakes the loop through its self-pipe), not one per delta."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, CompletionDelta]]] = {}
        streams = self._streams
        for d in deltas:
            stream = streams.get(d.request_id)
            if stream is not None:
                items = by_loop.get(stream.loop)
                if items is None:
                    items = by_loop[stream.loop] = []
                items.append((stream.queue, d))
        gone: list[str] = []
        for loop, items in by_loop.items():
            if not _call_soon(loop, _deliver, items):  # the consumers' loop is closed
                gone.extend(dict.fromkeys(d.request_id for _, d in items))
        for request_id in gone:  # nobody reads these any more: free their KV blocks
            if streams.pop(request_id, None) is not None:
                self.engine.abort(request_id)

    def _refresh_stats(self) -> None:
        eng = self.engine
        models = {}
        for name in eng.models:
            models[name] = ModelStats(
                running=eng.scheduler.num_running(name), waiting=eng.scheduler.num_waiting(name),
                blocks_used=eng.allocator.num_used_blocks(name),
                prompt_tokens_total=eng.prompt_tokens_total[name],
                generation_tokens_total=eng.generation_tokens_total[name],
                preemptions_total=eng.scheduler.num_preemptions[name])
        self.stats = EngineStats(models, eng.allocator.num_free_blocks, eng.pool.num_blocks,
                                 eng.num_steps)
        self.stats_time = time.monotonic()


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """``loop.call_soon_threadsafe(fn, *args)``; False if that loop is closed (its consumers went
    with it, e.g. an ``asyncio.run`` that ended), which must not take the engine thread down."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


def _deliver(items: list[tuple[asyncio.Queue, CompletionDelta]]) -> None:
    for inbox, delta in items:
        inbox.put_nowait(delta)


def _settle(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
