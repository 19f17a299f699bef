"""Fixtures for the structured-output tests: the embedded default model (SmolLM2-135M-Instruct)
served once per module, and a tiny random checkpoint with room for tool prompts."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from sparse_serve.engine.core.config import EngineConfig
from tests.live_server import LiveServer, small_config, tiny_engine
from tests.tiny_checkpoint import make_tiny_checkpoint

DEFAULT_NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def default_server() -> Iterator[LiveServer]:
    from sparse_serve.engine.checkpoints.default_model import DefaultModelMissingError, default_model_path
    from sparse_serve.server.cli import DEFAULT_MODEL_CONFIG

    try:
        path = default_model_path()
    except DefaultModelMissingError as exc:   # `make test` installs it; say loudly if not
        pytest.skip(f"embedded model package missing: {exc}")
    config = EngineConfig.load(DEFAULT_MODEL_CONFIG, overrides={
        "model.served_model_name": DEFAULT_NAME, "scheduler.max_num_seqs": 16,
        "server.shutdown_timeout_s": 5.0})
    engine = tiny_engine(config, path, kv_cache_bytes=64 << 20)
    with LiveServer(engine, config) as server:
        yield server


@pytest.fixture(scope="module")
def default_client(default_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=default_server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def roomy_model_dir(tmp_path_factory):
    """The tiny random checkpoint with a 1024-token window (tool instructions are long in its
    byte-level vocabulary)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("roomy") / "tiny-sparse", "relu",
                                max_position_embeddings=1024)


@pytest.fixture(scope="module")
def tiny_server(roomy_model_dir) -> Iterator[LiveServer]:
    """A live server on the roomy tiny checkpoint, shared by a module's tests."""
    config = small_config()
    with LiveServer(tiny_engine(config, roomy_model_dir), config) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny_http(tiny_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        yield client
