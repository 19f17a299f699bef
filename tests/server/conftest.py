"""Fixtures for the server tests.

`engine` is the one place that decides which engine the tests drive: the real AsyncEngine on a
tiny random checkpoint (CPU). `engine_config` can be overridden per test module to change
limits, keys or origins. The server and engine helpers live in tests/live_server.py (shared with
tests/observability) and are re-exported here for the existing imports.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from sparse_serve.engine.core.config import EngineConfig
from tests.live_server import LiveServer, small_config, tiny_engine, wait_until
from tests.tiny_checkpoint import make_tiny_checkpoint

__all__ = ["API_KEY", "LiveServer", "small_config", "wait_until"]

API_KEY = "test-key-123"


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
    return tiny_engine(engine_config, tiny_model_dir)


@pytest.fixture
def live_server(engine, engine_config) -> Iterator[LiveServer]:
    server = LiveServer(engine, engine_config).start()
    try:
        yield server
    finally:
        server.stop()


CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def http(live_server):
    import httpx

    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        yield client
