"""POST /v1/chat/completions: messages -> the model's chat template -> tokens -> completions.

The template renders in the sandbox of ``models/chat_template.py``; its output is encoded without
adding special tokens (templates write their own BOS), as transformers' ``apply_chat_template``
does, so /tokenize with the same messages gives exactly ``usage.prompt_tokens``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request

from modelhive.engine.output import TokenLogprob
from modelhive.errors import ConfigError, InvalidRequestError
from modelhive.models.tokenizer import Tokenizer
from modelhive.server.generation import (
    cancel_on_disconnect,
    collect,
    stream_choices,
    submit_prompts,
    usage,
)
from modelhive.server.metrics import RequestTimer
from modelhive.server.protocol import ChatCompletionRequest, message_dicts
from modelhive.server.routes import get_state
from modelhive.server.state import ServerState
from modelhive.server.streaming import SSEResponse

router = APIRouter()


def render_chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, Any]],
                       add_generation_prompt: bool = True) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ConfigError as exc:  # no template, or the model's template does not parse
        raise InvalidRequestError(f"{exc}", param="messages") from None


async def render_and_encode(tokenizer: Tokenizer, messages: list[dict[str, Any]],
                            add_generation_prompt: bool, add_special_tokens: bool = False
                            ) -> list[int]:
    """Chat template + tokenizer on a worker thread: a template may run up to its time limit
    (``RENDER_TIMEOUT_S``) and a long prompt takes a while to encode; neither may stall the
    event loop that streams every other request's tokens."""
    def work() -> list[int]:
        text = render_chat_prompt(tokenizer, messages, add_generation_prompt)
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    return await asyncio.to_thread(work)


def chat_logprobs(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(lp.token, lp.logprob),
                         "top_logprobs": [entry(text, value) for _, text, value in lp.top]}
                        for lp in logprobs]}


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    state.check_healthy()
    model = state.resolve_model(body.model)
    loaded = state.loaded(model)
    ids = await render_and_encode(loaded.tokenizer, message_dicts(body.messages),
                                  body.add_generation_prompt)
    params = body.to_sampling_params(len(ids), loaded.limits.max_model_len)
    timer = state.metrics.timer(model)
    request_id = state.new_id("chatcmpl")
    rids = await submit_prompts(state, model, [ids], [params], request_id, body.priority)
    if body.stream:
        return SSEResponse(_chunks(state, body, model, request_id, rids, len(ids), timer))
    choices = await cancel_on_disconnect(request, collect(state, rids, body.n, timer))
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": chat_logprobs(c.logprobs) if body.logprobs else None,
                     "finish_reason": c.finish_reason} for c in choices],
        "usage": usage(len(ids), sum(c.num_tokens for c in choices)),
    }


async def _chunks(state: ServerState, body: ChatCompletionRequest, model: str, request_id: str,
                  rids: list[str], prompt_tokens: int,
                  timer: RequestTimer) -> AsyncIterator[list[dict[str, Any]]]:
    """The response's chunks, a list of them for each batch of deltas (``stream_choices``)."""
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": choices}

    # the role comes first, as OpenAI sends it
    yield [chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                   "logprobs": None, "finish_reason": None}]) for index in range(body.n)]
    tokens: dict[int, int] = {}
    async with aclosing(stream_choices(state, rids, body.n, timer)) as batches:
        async for batch in batches:
            chunks = []
            for index, delta in batch:
                tokens[index] = delta.num_output_tokens
                content = {"content": delta.text} if delta.text or delta.logprobs else {}
                chunks.append(chunk([{"index": index, "delta": content,
                                      "logprobs": chat_logprobs(delta.logprobs or ())
                                      if body.logprobs else None,
                                      "finish_reason": delta.finish_reason}]))
            yield chunks
    if body.include_usage:
        yield [{**chunk([]), "usage": usage(prompt_tokens, sum(tokens.values()))}]
