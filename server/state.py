"""What the app knows at run time: the config, the engine once it is loaded, its metrics,
and whether the server is draining. Routes ask `ready_engine()` and get a 503 otherwise."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from sparse_serve.engine.core.client import EngineClient
from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.engine.core.outputs import RequestOutput
from sparse_serve.server.errors import SERVER_ERROR, OpenAIError
from sparse_serve.server.generation import GenerationRunner
from sparse_serve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    config: EngineConfig
    engine: EngineClient | None = None    # once loaded and started
    metrics: ServerMetrics | None = None
    runner: GenerationRunner | None = None
    draining: bool = False
    load_error: str | None = None
    on_fatal: Callable[[str], None] | None = None   # see build_app

    def ready_engine(self) -> EngineClient:
        if self.draining:
            raise OpenAIError(503, "The server is shutting down.", type=SERVER_ERROR,
                              code="shutting_down")
        if self.engine is None:
            if self.load_error is not None:
                raise OpenAIError(503, f"The model failed to load: {self.load_error}",
                                  type=SERVER_ERROR, code="model_load_failed")
            raise OpenAIError(503, "The model is still loading.", type=SERVER_ERROR,
                              code="model_loading", headers={"Retry-After": "5"})
        if self.engine.dead_reason is not None:
            raise OpenAIError(503, "The inference engine is not running.", type=SERVER_ERROR,
                              code="engine_dead")
        return self.engine

    async def attach_engine(self, engine: EngineClient) -> None:
        """Start the engine and wire its metrics; the server reports ready only after this."""
        await engine.start()
        metrics = ServerMetrics(engine.model_name, engine.num_layers)
        engine.step_listeners.append(metrics.observe_step)

        def on_finished(out: RequestOutput) -> None:
            # NOTE: from the engine, not from the response streams: a request whose client went
            # away is aborted with no one reading its stream, and still counts (as "abort")
            if out.stats is not None:
                metrics.observe_request_finished(out.stats)

        engine.request_listeners.append(on_finished)
        if self.on_fatal is not None:
            engine.death_listeners.append(lambda reason: self.on_fatal(f"the engine stopped: {reason}"))
        self.metrics = metrics
        self.runner = GenerationRunner(engine)
        self.engine = engine   # NOTE: set last: /health turns 200 on this assignment
        logger.info("serving model %s (max_model_len %d, %d params)", engine.model_name,
                    engine.max_model_len, engine.total_params)

    async def detach_engine(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.shutdown()


def get_state(request: Request) -> ServerState:
    return request.app.state.server
