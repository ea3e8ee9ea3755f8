"""GET /v1/models (and /v1/models/{name}): the models this port serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from modelhive.server.routes import get_state
from modelhive.server.state import ServerState

router = APIRouter()


def _card(state: ServerState, name: str) -> dict[str, Any]:
    loaded = state.loaded(name)
    plan = state.async_engine.engine.plan.model(name)
    return {"id": name, "object": "model", "created": state.created, "owned_by": "modelhive",
            "root": plan.source, "parent": None, "max_model_len": loaded.limits.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = get_state(request)
    body: dict[str, Any] = {"object": "list",
                            "data": [_card(state, name) for name in state.model_names]}
    if state.failed_models:  # not in "data": clients pick models from there
        body["failed"] = state.failed_models
    return body


@router.get("/v1/models/{name:path}")
async def retrieve_model(name: str, request: Request) -> dict[str, Any]:
    state = get_state(request)
    return _card(state, state.resolve_model(name))
