"""A real sparse-serve HTTP server for tests: the real AsyncEngine on a tiny checkpoint, served by
uvicorn on 127.0.0.1 at a free port in a background thread.

Shared by tests/server (through its conftest) and tests/observability:
    from tests.live_server import LiveServer, small_config, tiny_engine, wait_until
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.server.app import build_app
from sparse_serve.server.http_server import DrainingServer, bind_socket, make_server


def small_config(**overrides: Any) -> EngineConfig:
    """Limits sized for tiny models and a handful of concurrent test requests."""
    base = {
        "model.served_model_name": "tiny-sparse",
        "cache.block_size": 4,
        "scheduler.max_num_seqs": 8,
        "scheduler.max_queued_requests": 32,
        "server.shutdown_timeout_s": 5.0,
    }
    base.update(overrides)
    return EngineConfig.load(overrides=base)


def tiny_engine(config: EngineConfig, model_dir: str | Path, kv_cache_bytes: int = 8 << 20):
    """The real AsyncEngine on a tiny checkpoint, on the CPU (not started: the app starts it)."""
    from sparse_serve.engine.core.async_engine import AsyncEngine

    config.model.path = str(model_dir)
    config.model.device = "cpu"
    config.cache.kv_cache_bytes = kv_cache_bytes
    return AsyncEngine.from_config(config)


class LiveServer:
    """uvicorn on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, engine, config: EngineConfig, **app_kwargs) -> None:
        self.engine = engine
        self.config = config
        self.app = build_app(engine, config, **app_kwargs)
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.host_port = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host_port}"
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

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
