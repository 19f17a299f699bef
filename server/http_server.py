"""uvicorn, with a graceful drain: on SIGTERM/SIGINT new requests get 503 while the running
ones finish (uvicorn stops accepting connections and waits `shutdown_timeout_s` for them);
then the app's lifespan shuts the engine down. A drain that finished in time exits 0."""
from __future__ import annotations

import logging
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.server.state import ServerState

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0   # set to 1 by the CLI when the model fails to load
        self.drained = False   # True once every connection closed within the grace period

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.state.draining:
            logger.info("signal %d: draining (up to %.0f s for running requests)", sig,
                        self.config.timeout_graceful_shutdown or 0)
        self.state.draining = True
        super().handle_exit(sig, frame)

    async def _wait_tasks_to_complete(self) -> None:
        # uvicorn runs this under the grace-period timeout: returning means nothing was cut off
        await super()._wait_tasks_to_complete()
        self.drained = not self.force_exit

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.drained:
            # NOTE: uvicorn re-raises the caught signal (exit 143: a crash to supervisors); clean drain: 0
            self._captured_signals.clear()


def make_server(app: FastAPI, config: EngineConfig, *, log_level: str | None = None) -> DrainingServer:
    server_cfg = config.server
    uv_config = uvicorn.Config(
        app,
        host=server_cfg.host,
        port=server_cfg.port,
        log_level=(log_level or server_cfg.log_level).lower(),
        lifespan="on",
        timeout_graceful_shutdown=server_cfg.shutdown_timeout_s,  # type: ignore[arg-type]
        # NOTE: logging is configured by the CLI; uvicorn should not replace it.
        log_config=None,
    )
    return DrainingServer(uv_config, app.state.server)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket bound now (port 0 picks a free one), for tests and the CLI."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
