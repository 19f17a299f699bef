"""Fixtures for the server tests.

`engine` is the one place that decides which engine the tests drive: the real AsyncEngine on a
tiny random checkpoint (CPU). `engine_config` can be overridden per test module to change
limits, keys or origins.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from engine.config import EngineConfig
from server.app import build_app
from server.http_server import DrainingServer, bind_socket, make_server
from tests.tiny_checkpoint import make_tiny_checkpoint

API_KEY = "test-key-123"


def small_config(**overrides) -> EngineConfig:
    base = {
        "model.served_model_name": "tiny-sparse",
        "cache.block_size": 4,
        "scheduler.max_num_seqs": 8,
        "scheduler.max_queued_requests": 32,
        "server.shutdown_timeout_s": 5.0,
    }
    base.update(overrides)
    return EngineConfig.load(overrides=base)


@pytest.fixture
def engine_config(request) -> EngineConfig:
    """Overrides come from `@pytest.mark.parametrize("engine_config", [{...}], indirect=True)`."""
    return small_config(**getattr(request, "param", {}))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-sparse", "relu",
                                max_position_embeddings=256)


@pytest.fixture
def engine(engine_config: EngineConfig, tiny_model_dir):
    from engine.async_engine import AsyncEngine

    engine_config.model.path = str(tiny_model_dir)
    engine_config.model.device = "cpu"
    engine_config.cache.kv_cache_bytes = 8 << 20
    return AsyncEngine.from_config(engine_config)


class LiveServer:
    """uvicorn on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, engine, config: EngineConfig, **app_kwargs) -> None:
        self.engine = engine
        self.config = config
        self.app = build_app(engine, config, **app_kwargs)
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.server: DrainingServer = make_server(self.app, config, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def state(self):
        return self.app.state.server

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture
def live_server(engine, engine_config) -> Iterator[LiveServer]:
    server = LiveServer(engine, engine_config).start()
    try:
        yield server
    finally:
        server.stop()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
