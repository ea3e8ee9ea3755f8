"""GET /health (200 while the engine loop runs, 503 once it died) and GET /version."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from modelhive import __version__
from modelhive.server.routes import get_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    state = get_state(request)
    state.check_healthy()  # raises the 503
    body: dict[str, Any] = {"status": "ok", "models": state.model_names}
    if state.failed_models:  # --skip-failed-models left some out: the others serve
        body.update(status="degraded", failed_models=state.failed_models)
    return body


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}
