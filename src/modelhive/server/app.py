"""The FastAPI app factory: one app per listening port, all sharing one ``AsyncEngine``.

The main port's app serves every model; an app made with ``fixed_model`` (a model's own ``port``)
serves only that model, with the same routes, so a client of the old one-container-per-model setup
keeps working unchanged. ``cli/serve.py`` runs all of them in one process on one event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from modelhive import __version__
from modelhive.engine.client import AsyncEngine
from modelhive.server.errors import install_error_handlers
from modelhive.server.metrics import ServerMetrics
from modelhive.server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from modelhive.server.routes import routers
from modelhive.server.state import ServedConfig, ServerState

log = logging.getLogger("modelhive.server")


def create_app(async_engine: AsyncEngine, served_config: ServedConfig | None = None,
               api_key: str | None = None, *, metrics: ServerMetrics | None = None,
               fixed_model: str | None = None, manage_engine: bool = False) -> FastAPI:
    """Build the OpenAI-compatible app.

    ``metrics``: pass the same ``ServerMetrics`` to every app of one process (one registry).
    ``fixed_model``: this app serves only that model (a per-model port).
    ``manage_engine``: the app's lifespan starts the engine thread and shuts it down (draining
    in-flight requests) on exit; leave False when the caller owns the engine (the CLI, which runs
    several apps on one engine).
    """
    served = served_config or ServedConfig()
    if fixed_model is not None and fixed_model not in async_engine.engine.models:
        raise ValueError(f"fixed_model {fixed_model!r} is not a served model")
    state = ServerState(async_engine, served, metrics or ServerMetrics(async_engine), fixed_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            async_engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(async_engine.shutdown)

    title = "modelhive" if fixed_model is None else f"modelhive ({fixed_model})"
    app = FastAPI(title=title, version=__version__, lifespan=lifespan)
    app.state.modelhive = state
    install_error_handlers(app)
    for router in routers():
        app.include_router(router)
    # added last = outermost: the key is checked before the body is read
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=served.max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app
