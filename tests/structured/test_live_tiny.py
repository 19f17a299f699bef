"""Structured outputs through the HTTP server on the tiny checkpoint: metrics, the SSE shape of
tool-call deltas, n > 1 with logprobs, and auto tool choice reaching the parser."""
from __future__ import annotations

import json
import re


def parse_sse(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["n"]}
TOOL = {"type": "function", "function": {"name": "pick", "parameters": SCHEMA}}


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_metrics_count_constrained_requests_and_compiles(tiny_http):
    before = tiny_http.get("/metrics").text
    body = {"messages": MESSAGES, "max_tokens": 20, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                **SCHEMA, "title": "metrics-test"}}}}
    for _ in range(2):
        reply = tiny_http.post(CHAT, json=body)
        assert reply.status_code == 200
        assert 0 <= json.loads(reply.json()["choices"][0]["message"]["content"])["n"] <= 99
        assert reply.json()["usage"]["ffn_sparsity"] > 0       # sparsity still reported
    after = tiny_http.get("/metrics").text
    name = "sparseserve_structured_output_requests_total"
    assert metric(after, name, kind="json_schema") - metric(before, name, kind="json_schema") == 2
    compiles = "sparseserve_grammar_compile_seconds_count"
    assert metric(after, compiles) - metric(before, compiles) == 1          # the second was cached


def test_named_tool_call_streams_openai_deltas(tiny_http):
    body = {"messages": MESSAGES, "max_tokens": 20, "temperature": 0, "stream": True, "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "pick"}}}
    with tiny_http.stream("POST", CHAT, json=body) as reply:
        assert reply.status_code == 200
        events = parse_sse(reply.read().decode())
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None}
    head = deltas[1]["tool_calls"][0]
    assert head["index"] == 0 and head["type"] == "function" and re.fullmatch(r"call_[0-9a-f]{24}", head["id"])
    assert head["function"] == {"name": "pick", "arguments": ""}
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:] if d.get("tool_calls")]
    assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[2:] if d.get("tool_calls"))
    assert 0 <= json.loads("".join(pieces))["n"] <= 99
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_n_choices_with_logprobs_each_follow_the_grammar(tiny_client):
    completion = tiny_client.chat.completions.create(
        model="tiny-sparse", messages=MESSAGES, n=3, temperature=1.0, seed=5, max_tokens=20, logprobs=True,
        top_logprobs=2, extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}})
    for choice in completion.choices:
        assert choice.message.content in ("alpha", "beta", "gamma")
        assert choice.finish_reason == "stop"
        assert choice.logprobs.content and all(lp.logprob > float("-inf") for lp in choice.logprobs.content)


def test_auto_tool_choice_without_a_call_is_content(tiny_client):
    completion = tiny_client.chat.completions.create(
        model="tiny-sparse", messages=MESSAGES, tools=[TOOL], max_tokens=8, temperature=0)
    choice = completion.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")
