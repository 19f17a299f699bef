"""Parsers of the tool-call formats models are trained on (for tool_choice "auto").

Each parser turns a finished answer into (content, calls), where a call is (name, arguments as
a JSON text), and says where a call starts (`start`), so a stream can send plain text on
until a call begins. Each also writes calls in its own format (`render_call`) and tells a
model without tool support in its chat template how to call (`instructions`): the documented
fallback of server/tools/prompt.py.

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around
  them is content (Hermes, Qwen2.5, and our fallback prompt).
- mistral: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"} (Mistral v0.3 style).
- llama3_json: the whole answer is {"name": ..., "parameters": {...}} (or several separated by
  ";"), optionally after `<|python_tag|>` (Llama 3.1/3.2 JSON tool calling).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParsedCalls:
    content: str | None
    calls: list[tuple[str, str]] = field(default_factory=list)   # (name, arguments JSON text)


def _arguments_text(value: Any) -> str | None:
    if isinstance(value, str):       # some models write the arguments as a JSON string
        try:
            value = json.loads(value, strict=False)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def _call_from(obj: Any, arguments_key: str = "arguments") -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    text = _arguments_text(arguments)
    return None if text is None else (obj["name"], text)


def _tool_lines(tools: list[dict]) -> str:
    return "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)


class HermesParser:
    name = "hermes"
    start = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedCalls:
        if self.start not in text:
            return ParsedCalls(text)
        calls = []
        for match in self._CALL.finditer(text):
            try:
                call = _call_from(json.loads(match.group(1), strict=False))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return ParsedCalls(text)      # not a well-formed call: the text is content
            calls.append(call)
        content = self._CALL.sub("", text).strip()
        return ParsedCalls(content or None, calls)

    def render_call(self, name: str, arguments: str) -> str:
        return f"<tool_call>\n{{\"name\": {json.dumps(name)}, \"arguments\": {arguments}}}\n</tool_call>"

    def instructions(self, tools: list[dict]) -> str:
        return ("You can call functions. Their JSON schemas, one per line:\n" + _tool_lines(tools) +
                "\nTo call one, answer with <tool_call>{\"name\": <function name>, \"arguments\": "
                "<arguments object>}</tool_call> (one such block per call); otherwise answer normally.")


class MistralParser:
    name = "mistral"
    start = "[TOOL_CALLS]"

    def parse(self, text: str) -> ParsedCalls:
        head, marker, rest = text.partition(self.start)
        if not marker:
            return ParsedCalls(text)
        try:
            value, _ = json.JSONDecoder(strict=False).raw_decode(rest.strip())
        except json.JSONDecodeError:
            return ParsedCalls(text)
        items = value if isinstance(value, list) else [value]
        calls = [_call_from(item) for item in items]
        if not calls or any(c is None for c in calls):
            return ParsedCalls(text)
        return ParsedCalls(head.strip() or None, calls)   # type: ignore[arg-type]

    def render_call(self, name: str, arguments: str) -> str:
        return f"[TOOL_CALLS] [{{\"name\": {json.dumps(name)}, \"arguments\": {arguments}}}]"

    def instructions(self, tools: list[dict]) -> str:
        return ("You can call functions. Their JSON schemas, one per line:\n" + _tool_lines(tools) +
                "\nTo call, answer with [TOOL_CALLS] followed by a JSON list of {\"name\": <function "
                "name>, \"arguments\": <arguments object>}; otherwise answer normally.")


class Llama3JsonParser:
    name = "llama3_json"
    start = "{"
    _TAG = "<|python_tag|>"

    def parse(self, text: str) -> ParsedCalls:
        body = text.strip().removeprefix(self._TAG).strip()
        if not body.startswith("{"):
            return ParsedCalls(text)
        calls, decoder, pos = [], json.JSONDecoder(strict=False), 0
        while pos < len(body):
            try:
                value, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return ParsedCalls(text)
            call = _call_from(value, "parameters")
            if call is None:
                return ParsedCalls(text)
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \n\t;":
                pos += 1
        return ParsedCalls(None, calls)

    def render_call(self, name: str, arguments: str) -> str:
        return f"{{\"name\": {json.dumps(name)}, \"parameters\": {arguments}}}"

    def instructions(self, tools: list[dict]) -> str:
        return ("You can call functions. Their JSON schemas, one per line:\n" + _tool_lines(tools) +
                "\nTo call one, answer only with {\"name\": <function name>, \"parameters\": "
                "<arguments object>}; otherwise answer normally.")


PARSERS = {p.name: p for p in (HermesParser(), MistralParser(), Llama3JsonParser())}
DEFAULT_PARSER = "hermes"


def get_parser(name: str):
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {sorted(PARSERS)}") from None
