"""Raw HTTP: every error shape, auth, limits, request ids, CORS."""
from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import API_KEY, CHAT, MESSAGES


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in resp.text
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_malformed_json_is_400(http):
    resp = http.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert_error(resp, 400, code="invalid_json")


def test_body_that_is_not_a_json_object(http):
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    form = http.post(CHAT, content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert "Content-Type: application/json" in assert_error(form, 400, code="invalid_body")["message"]
    assert_error(http.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"}), 400,
                 code="invalid_body")
    empty = http.post(CHAT, content=b"", headers={"content-type": "application/json"})
    assert "empty" in assert_error(empty, 400)["message"]


def test_validation_error_is_400_not_422(http):
    assert_error(http.post(CHAT, json={"messages": "not a list"}), 400, param="messages")
    assert_error(http.post(CHAT, json={}), 400, param="messages")
    assert_error(http.post(CHAT, json={"messages": MESSAGES, "max_tokens": "many"}), 400, param="max_tokens")
    assert_error(http.post("/v1/completions", json={"prompt": []}), 400, param="prompt")


def test_unknown_field_is_named(http):
    error = assert_error(http.post(CHAT, json={"messages": MESSAGES, "frobnicate": 1}), 400,
                         param="frobnicate", code="unsupported_parameter")
    assert "frobnicate" in error["message"]


@pytest.mark.parametrize("field, value", [
    ("tool_choice", "auto"),            # without tools (tools themselves: tests/structured)
    ("functions", [{"name": "f"}]),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("store", True),
    ("reasoning_effort", "low"),
])
def test_unsupported_chat_fields_are_named(http, field, value):
    error = assert_error(http.post(CHAT, json={"messages": MESSAGES, field: value}), 400, param=field)
    assert field in error["message"]


def test_noop_values_of_unsupported_fields_pass(http):
    body = {"messages": MESSAGES, "max_tokens": 2, "tool_choice": "none", "response_format": {"type": "text"},
            "modalities": ["text"], "store": False, "user": "u1", "parallel_tool_calls": False}
    assert http.post(CHAT, json=body).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "suffix": "z"}, "suffix"),
    ({"prompt": "a", "echo": True, "logprobs": 1}, "logprobs"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
])
def test_unsupported_or_invalid_completion_fields(http, body, param):
    assert_error(http.post("/v1/completions", json=body), 400, param=param)


def test_non_text_content_part_is_rejected(http):
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(http.post(CHAT, json={"messages": messages}), 400, param="messages.0.content.1")
    text_parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert http.post(CHAT, json={"messages": text_parts, "max_tokens": 1}).status_code == 200


def test_legacy_function_messages_rejected(http):
    messages = MESSAGES + [{"role": "function", "content": "42", "name": "f"}]
    assert_error(http.post(CHAT, json={"messages": messages}), 400, param="messages.1.role")


def test_unknown_model_is_404(http):
    assert_error(http.post(CHAT, json={"model": "gpt-9", "messages": MESSAGES}), 404, param="model",
                 code="model_not_found")
    assert_error(http.get("/v1/models/gpt-9"), 404, code="model_not_found")


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get(CHAT), 405)


def test_prompt_too_long_names_both_numbers(http, live_server):
    limit = live_server.engine.max_model_len
    prompt = "x " * (limit - 3)
    num_prompt = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    error = assert_error(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10}),
                         400, code="context_length_exceeded")
    assert str(limit) in error["message"]
    assert str(num_prompt) in error["message"] or str(num_prompt + 10) in error["message"]


class TokenizerProxy:
    """Wraps the engine's tokenizer, overriding some attributes (works for any engine)."""

    def __init__(self, inner, **overrides) -> None:
        self._inner = inner
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_internal_error_is_500_without_traceback(http, live_server, monkeypatch):
    def explode(messages, **kwargs):
        raise RuntimeError("secret internal detail")

    engine = live_server.engine
    monkeypatch.setattr(engine.processor, "tokenizer", TokenizerProxy(engine.processor.tokenizer, encode_chat=explode))
    resp = http.post(CHAT, json={"messages": MESSAGES}, headers={"x-request-id": "trace-me-1"})
    error = assert_error(resp, 500, code="internal_error")
    assert "secret internal detail" not in resp.text
    assert "trace-me-1" in error["message"]
    assert resp.headers["x-request-id"] == "trace-me-1"


def test_request_id_echoed_or_generated(http):
    resp = http.get("/v1/models", headers={"x-request-id": "client-abc.1"})
    assert resp.headers["x-request-id"] == "client-abc.1"
    generated = http.get("/v1/models").headers["x-request-id"]
    assert len(generated) == 32
    bad = http.get("/v1/models", headers={"x-request-id": "x" * 500}).headers["x-request-id"]
    assert bad != "x" * 500
    assert http.post(CHAT, json={}).headers["x-request-id"]          # error responses too
    assert http.get("/nowhere").headers["x-request-id"]


def test_no_chat_template_is_a_clear_400(http, live_server, monkeypatch):
    engine = live_server.engine
    monkeypatch.setattr(engine.processor, "tokenizer", TokenizerProxy(engine.processor.tokenizer, has_chat_template=False))
    error = assert_error(http.post(CHAT, json={"messages": MESSAGES}), 400, code="no_chat_template")
    assert "--chat-template" in error["message"]
    assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


def test_chat_template_failure_is_400(http, live_server, monkeypatch):
    def refuse(messages, **kwargs):
        raise ValueError("Conversation roles must alternate user/assistant")

    engine = live_server.engine
    monkeypatch.setattr(engine.processor, "tokenizer", TokenizerProxy(engine.processor.tokenizer, encode_chat=refuse))
    error = assert_error(http.post(CHAT, json={"messages": MESSAGES}), 400, code="chat_template_error")
    assert "alternate" in error["message"]


def test_top_logprobs_bounds(http):
    body = {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}
    assert_error(http.post(CHAT, json=body), 400, param="top_logprobs")
    assert_error(http.post(CHAT, json={"messages": MESSAGES, "top_logprobs": 2}), 400, param="top_logprobs")


@pytest.mark.parametrize("engine_config", [{"server.max_body_bytes": 2048}], indirect=True)
def test_body_too_large_is_413(http):
    big = {"messages": [{"role": "user", "content": "x" * 4096}]}
    assert_error(http.post(CHAT, json=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(8):
            yield b" " * 512
    assert_error(http.post(CHAT, content=chunks(), headers={"content-type": "application/json"}), 413)
    assert http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("engine_config", [{"server.api_keys": ["other-key", API_KEY]}], indirect=True)
def test_api_keys(http):
    assert_error(http.get("/v1/models"), 401, code="invalid_api_key")
    assert_error(http.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, code="invalid_api_key")
    assert_error(http.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"}), 401)
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert http.get("/v1/models", headers={"Authorization": "Bearer other-key"}).status_code == 200
    resp = http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 1},
                     headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 200
    # health and metrics stay open for probes and Prometheus
    assert http.get("/health").status_code == 200
    assert http.get("/metrics").status_code == 200


def test_cors_off_by_default(http):
    resp = http.get("/v1/models", headers={"Origin": "https://example.com"})
    assert "access-control-allow-origin" not in resp.headers
    preflight = http.options(CHAT, headers={"Origin": "https://example.com",
                                            "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize("engine_config", [{"server.allowed_origins": ["https://ok.example"],
                                            "server.api_keys": [API_KEY]}], indirect=True)
def test_cors_with_allowed_origins(http):
    preflight = http.options(CHAT, headers={"Origin": "https://ok.example",
                                            "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://ok.example"
    resp = http.get("/v1/models", headers={"Origin": "https://ok.example",
                                           "Authorization": f"Bearer {API_KEY}"})
    assert resp.headers["access-control-allow-origin"] == "https://ok.example"
    assert "x-request-id" in resp.headers["access-control-expose-headers"].lower()
    other = http.get("/v1/models", headers={"Origin": "https://evil.example",
                                            "Authorization": f"Bearer {API_KEY}"})
    assert "access-control-allow-origin" not in other.headers


def test_user_field_is_logged(http, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="sparse_serve.server.inputs"):
        resp = http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2, "user": "alice-42"})
    assert resp.status_code == 200
    assert any("alice-42" in record.getMessage() for record in caplog.records)
