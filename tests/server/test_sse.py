"""SSE framing as a curl user sees it, and errors after the stream has started."""
from __future__ import annotations

import json

import pytest

from tests.server.conftest import CHAT, MESSAGES, wait_until


def parse_events(raw: str) -> list[dict | str]:
    """Split an SSE body strictly: every event is exactly `data: <payload>` + blank line."""
    assert raw.endswith("\n\n"), raw[-50:]
    events = []
    for block in raw[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_chat_stream_framing(http):
    resp = http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 4, "n": 2, "stream": True,
                                 "stream_options": {"include_usage": True}, "ignore_eos": True},
                     headers={"x-request-id": "sse-1"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-request-id"] == "sse-1"
    events = parse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["delta"] == {}
        assert all(m["finish_reason"] is None for m in mine[:-1])
        assert "".join(m["delta"].get("content", "") for m in mine)
    assert all(c["usage"] is None for c in chunks[:-1])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == 8
    assert {"activated_params", "total_params", "ffn_sparsity", "prompt_tokens_details"} <= set(usage)


def test_stream_without_include_usage_has_no_usage_key(http):
    events = parse_events(http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2, "stream": True}).text)
    assert all("usage" not in e for e in events[:-1])


def test_completion_stream_echo_and_stop(http):
    greedy = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0}).json()
    text = greedy["choices"][0]["text"]
    stop = text[4:6]
    resp = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0,
                                              "stream": True, "echo": True, "stop": stop})
    events = parse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["text"] == "abc"          # the echoed prompt comes first
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == "abc" + text[: text.find(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_refusal_before_stream_keeps_status_code(http):
    resp = http.post(CHAT, json={"messages": MESSAGES, "stream": True, "temperature": 9})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "temperature"


def test_error_mid_stream_is_an_event_then_done(http, live_server, monkeypatch):
    engine = live_server.engine
    original = engine.generate

    async def failing_generate(request):
        # NOTE: count only outputs that carried text (a delta may hold back half a character),
        # so some content has surely been streamed before the failure.
        count = 0
        async for out in original(request):
            yield out
            count += any(delta.text for delta in out.outputs)
            if count == 2:
                raise RuntimeError("kernel fell over with secret detail")

    monkeypatch.setattr(engine, "generate", failing_generate)
    resp = http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 50, "stream": True, "ignore_eos": True},
                     headers={"x-request-id": "boom-1"})
    assert resp.status_code == 200
    events = parse_events(resp.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "secret detail" not in resp.text
    assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events[:-2])
    # the failed request's KV blocks are given back
    assert wait_until(lambda: engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks)


def test_openai_sdk_raises_on_error_event(live_server, monkeypatch):
    import openai

    engine = live_server.engine
    original = engine.generate

    async def failing_generate(request):
        async for out in original(request):
            yield out
            raise RuntimeError("boom")

    monkeypatch.setattr(engine, "generate", failing_generate)
    client = openai.OpenAI(base_url=live_server.base_url, api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="tiny-sparse", messages=MESSAGES, max_tokens=20, stream=True)
    with pytest.raises(openai.APIError):
        list(stream)
