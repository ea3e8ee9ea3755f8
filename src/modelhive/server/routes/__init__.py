"""One module per endpoint group; ``ROUTERS`` is what ``create_app`` mounts."""

from __future__ import annotations

from fastapi import Request

from modelhive.server.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.modelhive


def routers():
    from modelhive.server.routes import chat, completions, health, metrics, models, ps, tokenize

    return [models.router, completions.router, chat.router, tokenize.router, health.router,
            metrics.router, ps.router]
