"""The app factory: `build_app(engine, config)` wires state, middleware, error handlers, routes.

Tests pass a ready engine; the CLI passes `engine=None` and an `engine_loader` so the server
listens (and /health answers 503) while the model loads in a background thread.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.server import routes_chat, routes_completions, routes_misc
from sparse_serve.server.errors import install_handlers
from sparse_serve.server.generation import ClientDisconnected
from sparse_serve.server.loader import start_background_load
from sparse_serve.server.middleware import (
    REQUEST_ID_HEADER,
    AuthMiddleware,
    BodyLimitMiddleware,
    RequestContextMiddleware,
)
from sparse_serve.server.state import ServerState

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's convention; only ever seen in logs and metrics


def build_app(engine: Any | None, config: EngineConfig, *,
              engine_loader: Callable[[], Any] | None = None,
              on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """on_fatal(message): the model failed to load, or the engine stopped for good (the CLI
    then exits with code 1, for the container's restart policy)."""
    state = ServerState(config=config, on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            await state.attach_engine(engine)
        elif engine_loader is not None:
            start_background_load(state, engine_loader, asyncio.get_running_loop())
        try:
            yield
        finally:
            state.draining = True
            await state.detach_engine()

    app = FastAPI(title="sparse-serve", lifespan=lifespan)
    app.state.server = state
    install_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(request: Request, _: ClientDisconnected) -> Response:
        logger.info("request %s: client disconnected; aborted", request.scope.get("request_id"))
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    for module in (routes_chat, routes_completions, routes_misc):
        app.include_router(module.router)

    # NOTE: add_middleware puts each new one outermost, so this reads inside-out:
    # CORS -> request context -> auth -> body limit -> routes.
    server_cfg = config.server
    app.add_middleware(BodyLimitMiddleware, max_bytes=server_cfg.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_keys=list(server_cfg.api_keys))
    app.add_middleware(RequestContextMiddleware, state=state)
    if server_cfg.allowed_origins:
        # CORS is off unless origins are configured; when on it answers preflights before auth.
        app.add_middleware(CORSMiddleware, allow_origins=list(server_cfg.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                           expose_headers=[REQUEST_ID_HEADER])
    return app
