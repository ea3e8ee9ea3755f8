"""GET /metrics: Prometheus text format (see server/metrics.py for the names)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from modelhive.server.metrics import CONTENT_TYPE
from modelhive.server.routes import get_state

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)
