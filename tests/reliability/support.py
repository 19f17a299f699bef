"""Small helpers shared by the reliability tests."""
from __future__ import annotations

import json


def engine_idle(engine) -> bool:
    """Nothing running, waiting or pending in the engine, and every KV block free."""
    stats = engine.get_stats()
    return (stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
            and stats.num_free_blocks == stats.num_total_blocks
            and engine.num_unfinished == 0 and not engine.core.requests)


def sse_events(text: str) -> list[dict]:
    """The JSON payloads of an SSE body, [DONE] excluded; asserts that it ends with [DONE]."""
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    payloads = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    return [json.loads(p) for p in payloads[:-1]]


def assert_openai_error(body: dict, code: str | None = None) -> None:
    """`{"error": {"message", "type", "param", "code"}}` and nothing else."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
