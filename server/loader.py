"""Loading the model off the event loop, so /health can answer 503 while it loads.

The load itself (`AsyncEngine.from_config`) is slow and blocking; it runs in a thread, and the
engine is then started on the server's event loop.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.server.state import ServerState

logger = logging.getLogger(__name__)


def load_engine(config: EngineConfig) -> Any:
    """Build the engine (with no model path, AsyncEngine.from_config serves the embedded
    default model).

    NOTE: the import is lazy: the engine and its torch import stay out of the CLI's start-up.
    """
    from sparse_serve.engine.core.async_engine import AsyncEngine

    return AsyncEngine.from_config(config)


def start_background_load(state: ServerState, load: Callable[[], Any],
                          loop: asyncio.AbstractEventLoop) -> threading.Thread:
    def fail(message: str) -> None:
        state.load_error = message
        if state.on_fatal is not None:
            state.on_fatal(f"the model could not be loaded ({message})")

    def run() -> None:
        started = time.monotonic()
        try:
            engine = load()
        except Exception as exc:
            logger.exception("model load failed")
            loop.call_soon_threadsafe(fail, f"{type(exc).__name__}: {exc}")
            return
        logger.info("model loaded in %.1f s", time.monotonic() - started)
        try:
            asyncio.run_coroutine_threadsafe(state.attach_engine(engine), loop).result()
        except Exception as exc:
            logger.exception("engine start failed")
            try:
                loop.call_soon_threadsafe(fail, f"{type(exc).__name__}: {exc}")
            except RuntimeError:  # the loop is already closed: the server stopped meanwhile
                pass

    thread = threading.Thread(target=run, name="model-loader", daemon=True)
    thread.start()
    return thread
