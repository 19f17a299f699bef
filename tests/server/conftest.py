"""Constants for the server tests; the fixtures (`engine_config`, `engine`, `live_server`,
`http`) come from tests/conftest.py. The server and engine helpers live in
tests/live_server.py and are re-exported here for the existing imports.
"""
from __future__ import annotations

from tests.live_server import LiveServer, small_config, wait_until

__all__ = ["API_KEY", "LiveServer", "small_config", "wait_until"]

API_KEY = "test-key-123"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]

