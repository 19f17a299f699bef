"""Fixtures every folder may use: a real server on a tiny random checkpoint.

`engine` is the one place that decides which engine the HTTP tests drive: the real AsyncEngine
on a tiny random checkpoint (CPU). `engine_config` takes per-test overrides through
`@pytest.mark.parametrize("engine_config", [{...}], indirect=True)`; `live_server` serves the
engine with uvicorn on 127.0.0.1 (tests/live_server.py), and `http` is a client for it.
"""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from sparse_serve.engine.core.config import EngineConfig
from tests.live_server import LiveServer, small_config, tiny_engine
from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-sparse", "relu",
                                max_position_embeddings=256)


@pytest.fixture
def engine_config(request) -> EngineConfig:
    return small_config(**getattr(request, "param", {}))


@pytest.fixture
def engine(engine_config: EngineConfig, tiny_model_dir):
    return tiny_engine(engine_config, tiny_model_dir)


@pytest.fixture
def live_server(engine, engine_config) -> Iterator[LiveServer]:
    server = LiveServer(engine, engine_config).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(live_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        yield client
