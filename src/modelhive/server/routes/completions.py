"""POST /v1/completions: one prompt or a list (text or token ids), ``n`` completions each."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
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


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    state = get_state(request)
    state.check_healthy()
    model = state.resolve_model(body.model)
    max_model_len = state.loaded(model).limits.max_model_len
    prompts = [state.async_engine.engine.tokenize(model, p) for p in body.prompts()]
    params = [body.to_sampling_params(len(ids), max_model_len) for ids in prompts]
    timer = state.metrics.timer(model)
    request_id = state.new_id("cmpl")
    rids = await submit_prompts(state, model, prompts, params, request_id, body.priority)
    prompt_tokens = sum(len(ids) for ids in prompts)
    if body.stream:
        return SSEResponse(_chunks(state, body, model, request_id, rids, prompt_tokens, timer))
    choices = await cancel_on_disconnect(request, collect(state, rids, body.n, timer))
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                     "logprobs": completion_logprobs(c.logprobs) if body.logprobs is not None
                     else None} for c in choices],
        "usage": usage(prompt_tokens, sum(c.num_tokens for c in choices)),
    }


async def _chunks(state: ServerState, body: CompletionRequest, model: str, request_id: str,
                  rids: list[str], prompt_tokens: int,
                  timer: RequestTimer) -> AsyncIterator[dict[str, Any]]:
    created = int(time.time())
    tokens: dict[int, int] = {}
    offsets: dict[int, int] = {}
    async with aclosing(stream_choices(state, rids, body.n, timer)) as deltas:
        async for index, delta in deltas:
            tokens[index] = delta.num_output_tokens
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(delta.logprobs or (), offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(lp.token)
                                                             for lp in delta.logprobs or ())
            yield {"id": request_id, "object": "text_completion", "created": created,
                   "model": model, "choices": [{"index": index, "text": delta.text,
                                                "logprobs": logprobs,
                                                "finish_reason": delta.finish_reason}]}
    if body.include_usage:
        yield {"id": request_id, "object": "text_completion", "created": created, "model": model,
               "choices": [], "usage": usage(prompt_tokens, sum(tokens.values()))}
