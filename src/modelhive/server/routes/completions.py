"""POST /v1/completions: one prompt or a list (text or token ids), ``n`` completions each.

``echo``: each choice's text starts with its prompt (as given, or decoded from token ids); with
``logprobs``, the logprobs start with the prompt's tokens too, the first without a logprob
(nothing precedes it), the others scored by the engine (``SamplingParams.prompt_logprobs``).
Streamed, the prompt comes with each choice's first chunk. ``echo`` with ``max_tokens`` 0: the
prompt alone (``finish_reason`` "length", no completion tokens), as vLLM answers it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request

from modelhive.engine.output import TokenLogprob
from modelhive.server.generation import (
    cancel_on_disconnect,
    collect,
    stream_choices,
    submit_prompts,
    usage,
)
from modelhive.server.metrics import RequestTimer
from modelhive.server.protocol import CompletionRequest
from modelhive.server.routes import get_state
from modelhive.server.state import ServerState
from modelhive.server.streaming import SSEResponse

router = APIRouter()


def completion_logprobs(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...],
                        offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy logprobs object: parallel lists per token."""
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for lp in logprobs:
        tokens.append(lp.token)
        token_logprobs.append(lp.logprob)
        top.append({text: value for _, text, value in lp.top})
        text_offset.append(offset)
        offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": text_offset}


def echo_logprobs(first_token: str, prompt: tuple[TokenLogprob, ...],
                  logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """The logprobs object of an echoed choice: the prompt's first token (no logprob), its
    scored tokens, then the output's."""
    scored = completion_logprobs(tuple(prompt) + tuple(logprobs), len(first_token))
    return {"tokens": [first_token] + scored["tokens"],
            "token_logprobs": [None] + scored["token_logprobs"],
            "top_logprobs": [None] + scored["top_logprobs"],
            "text_offset": [0] + scored["text_offset"]}


@dataclass(frozen=True)
class _Echo:
    """What echoing one prompt adds: its text and its first token's text."""

    text: str
    first_token: str

    def apply(self, body: CompletionRequest, text: str, reason: str | None,
              prompt_logprobs: tuple[TokenLogprob, ...],
              logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...]):
        """(text, logprobs object or None, finish_reason) of a choice's response or first
        chunk with the prompt in front; ``echo_only``: the prompt alone."""
        only = body.echo_only
        lps = None
        if body.logprobs is not None:
            lps = echo_logprobs(self.first_token, prompt_logprobs, () if only else logprobs)
        if only:
            return self.text, lps, "length"
        return self.text + text, lps, reason


def _end_offset(logprobs: dict[str, Any]) -> int:
    """The text offset after a (non-empty) logprobs object's last token."""
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def _echoes(state: ServerState, model: str, body: CompletionRequest,
            prompts: list[list[int]]) -> list[_Echo] | None:
    if not body.echo:
        return None
    tokenizer = state.loaded(model).tokenizer
    return [_Echo(p if isinstance(p, str) else tokenizer.decode(ids, skip_special_tokens=False),
                  tokenizer.logprob_text(ids[0]))
            for p, ids in zip(body.prompts(), prompts, strict=True)]


async def tokenize_prompts(state: ServerState, model: str,
                           prompts: list[str | list[int]]) -> list[list[int]]:
    """The prompts' token ids; text is encoded on a worker thread, as chat prompts are: a long
    prompt takes milliseconds to encode (~15 ms for 7,000 tokens on a 2-core CPU), which on the
    event loop would hold every stream's tokens back."""
    engine = state.async_engine.engine
    if not any(isinstance(p, str) for p in prompts):
        return [engine.tokenize(model, p) for p in prompts]
    return await asyncio.to_thread(lambda: [engine.tokenize(model, p) for p in prompts])


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    state = get_state(request)
    state.check_healthy()
    model = state.resolve_model(body.model)
    max_model_len = state.loaded(model).limits.max_model_len
    prompts = await tokenize_prompts(state, model, body.prompts())
    params = [body.to_sampling_params(len(ids), max_model_len) for ids in prompts]
    timer = state.metrics.timer(model)
    request_id = state.new_id("cmpl")
    rids = await submit_prompts(state, model, prompts, params, request_id, body.priority)
    prompt_tokens = sum(len(ids) for ids in prompts)
    echoes = _echoes(state, model, body, prompts)
    if body.stream:
        return SSEResponse(_chunks(state, body, model, request_id, rids, prompt_tokens, timer,
                                   echoes))
    choices = await cancel_on_disconnect(request, collect(state, rids, body.n, timer))
    out = []
    for c in choices:
        text, logprobs, reason = c.text, None, c.finish_reason
        if echoes is not None:
            text, logprobs, reason = echoes[c.index // body.n].apply(
                body, text, reason, c.prompt_logprobs, c.logprobs)
        elif body.logprobs is not None:
            logprobs = completion_logprobs(c.logprobs)
        out.append({"index": c.index, "text": text, "finish_reason": reason,
                    "logprobs": logprobs})
    completion_tokens = 0 if body.echo_only else sum(c.num_tokens for c in choices)
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": out, "usage": usage(prompt_tokens, completion_tokens),
    }


async def _chunks(state: ServerState, body: CompletionRequest, model: str, request_id: str,
                  rids: list[str], prompt_tokens: int, timer: RequestTimer,
                  echoes: list[_Echo] | None) -> AsyncIterator[list[dict[str, Any]]]:
    """The response's chunks, a list of them for each batch of deltas (``stream_choices``)."""
    created = int(time.time())
    tokens: dict[int, int] = {}
    offsets: dict[int, int] = {}
    only = body.echo_only
    async with aclosing(stream_choices(state, rids, body.n, timer)) as batches:
        async for batch in batches:
            chunks = []
            for index, delta in batch:
                first = index not in tokens
                if only and not first:
                    continue  # the prompt went with the first chunk, and nothing else is sent
                tokens[index] = 0 if only else delta.num_output_tokens
                text, logprobs, reason = delta.text, None, delta.finish_reason
                if echoes is not None and first:  # the prompt comes with the first chunk
                    text, logprobs, reason = echoes[index // body.n].apply(
                        body, text, reason, delta.prompt_logprobs or (), delta.logprobs or ())
                elif body.logprobs is not None:
                    logprobs = completion_logprobs(delta.logprobs or (), offsets.get(index, 0))
                if logprobs is not None and logprobs["tokens"]:
                    offsets[index] = _end_offset(logprobs)
                chunks.append({"id": request_id, "object": "text_completion",
                               "created": created, "model": model,
                               "choices": [{"index": index, "text": text,
                                            "logprobs": logprobs, "finish_reason": reason}]})
            if chunks:
                yield chunks
    if body.include_usage:
        yield [{"id": request_id, "object": "text_completion", "created": created,
                "model": model, "choices": [],
                "usage": usage(prompt_tokens, sum(tokens.values()))}]
