"""POST /tokenize and POST /detokenize (vLLM's shapes), so clients can count tokens exactly.

/tokenize takes ``prompt`` (add_special_tokens defaults to true, as /v1/completions encodes) or
``messages`` (rendered with the chat template and encoded without special tokens, exactly as
/v1/chat/completions does), so ``count`` equals the request's ``usage.prompt_tokens``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from modelhive.errors import InvalidRequestError
from modelhive.server.protocol import DetokenizeRequest, TokenizeRequest, message_dicts
from modelhive.server.routes import get_state
from modelhive.server.routes.chat import render_and_encode

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    state = get_state(request)
    model = state.resolve_model(body.model)
    loaded = state.loaded(model)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        ids = await render_and_encode(loaded.tokenizer, message_dicts(body.messages),
                                      body.add_generation_prompt, bool(body.add_special_tokens))
    else:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        # a worker thread, as for the generation routes: a long text must not stall the streams
        ids = await asyncio.to_thread(loaded.tokenizer.encode, body.prompt,
                                      add_special_tokens=add_special)
    return {"count": len(ids), "max_model_len": loaded.limits.max_model_len, "tokens": ids}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    state = get_state(request)
    model = state.resolve_model(body.model)
    loaded = state.loaded(model)
    vocab_size = loaded.runner.model.arch.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"tokens must be ids in [0, {vocab_size}); got {bad[0]}",
                                  param="tokens")
    text = await asyncio.to_thread(loaded.tokenizer.decode, body.tokens,
                                   skip_special_tokens=False)
    return {"prompt": text}
