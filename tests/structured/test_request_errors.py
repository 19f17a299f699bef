"""Every way a structured-output or tool request can be wrong is a 400 naming the field (and,
for schemas, the problem or the unsupported keyword); never an unconstrained answer."""
from __future__ import annotations

import pytest

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.mark.parametrize("extra, param, words", [
    # schemas and grammars that cannot compile: the backend's reason
    ({"response_format": schema_format({"type": "strin"})}, "response_format.json_schema.schema",
     ["Unsupported type", "strin"]),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs.regex", ["parenthesis"]),
    ({"structured_outputs": {"grammar": 'root ::= "a" | b'}}, "structured_outputs.grammar", ["not defined"]),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", ["not a JSON schema"]),
    # schema features the grammar cannot enforce: the keyword is named
    ({"response_format": schema_format({"type": "array", "uniqueItems": True})},
     "response_format.json_schema.schema", ["uniqueItems"]),
    ({"response_format": schema_format({"type": "object", "properties": {
        "a": {"type": "object", "if": {"required": ["x"]}, "then": {"required": ["y"]}}}})},
     "response_format.json_schema.schema", ["'if'", "#/properties/a"]),
    ({"response_format": schema_format({"type": "number", "multipleOf": 0.5})},
     "response_format.json_schema.schema", ["multipleOf"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}], "tool_choice": "required"},
     "tools", ["'not'"]),
    # malformed requests
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", []),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", []),
    ({"response_format": {"type": "yaml"}}, "response_format.type", []),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", ["exactly one"]),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", []),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", []),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs", []),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", []),
    ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens", []),
    # tools
    ({"tool_choice": "required"}, "tool_choice", ["needs 'tools'"]),
    ({"tools": [TOOL], "tool_choice": "always"}, "tool_choice", ["'always'"]),
    ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice", ["named choice"]),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", ["'g'"]),
    ({"tools": [TOOL, TOOL]}, "tools", ["unique"]),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools.0.type", []),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", []),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters", ["object"]),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", []),
    ({"tools": [TOOL], "response_format": {"type": "json_object"}}, "response_format", []),
    ({"functions": [{"name": "f"}]}, "functions", ["legacy"]),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages.0.role", ["legacy"]),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id", []),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0.tool_calls", ["assistant"]),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages.0.tool_calls.0.function.arguments", ["JSON"]),
])
def test_bad_requests_are_400_naming_the_problem(tiny_http, extra, param, words):
    body = {"messages": MESSAGES, "max_tokens": 4, **extra}
    reply = tiny_http.post(CHAT, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error


def test_completions_take_structured_outputs_too(tiny_http):
    reply = tiny_http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4,
                                                    "structured_outputs": {"regex": "(("}})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "structured_outputs.regex"
    reply = tiny_http.post("/v1/completions", json={"prompt": "x", "max_tokens": 8, "temperature": 0,
                                                    "structured_outputs": {"regex": "[0-9]{4}"}})
    assert reply.status_code == 200
    text = reply.json()["choices"][0]["text"]
    assert len(text) == 4 and text.isdigit()
