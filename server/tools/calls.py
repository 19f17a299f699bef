"""A choice's text -> the assistant message OpenAI sends, with `tool_calls` where there are
calls, for whole answers (`ToolCalls.message`) and for streams (`ChoiceStream`).

How each tool_choice reads the text:
- none: the text is the content.
- named: the grammar made the text the forced function's arguments object.
- required: the grammar made the text a JSON list of {"name", "arguments"}.
- auto: the --tool-call-parser finds calls in the model's own format; the content is the text
  before the first call (trailing whitespace dropped); without a well-formed call, it is all
  content.
A choice that returns calls and stopped on its own gets finish_reason "tool_calls".

Streams send the same thing as deltas, the way OpenAI does: per call a first delta with
index, id, type and name (arguments ""), then argument pieces. Named calls stream their
arguments as they are generated; required and auto calls are sent once the answer is complete
(they must be parsed first), and auto sends content on until a call could begin.
"""
from __future__ import annotations

import json
import uuid
from typing import Any


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _finish(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


class ToolCalls:
    """Per request: how its choices' texts become messages."""

    def __init__(self, mode: str, parser=None, forced_name: str | None = None, parallel: bool = True):
        self.mode, self.parser, self.forced_name, self.parallel = mode, parser, forced_name, parallel

    def calls(self, text: str) -> tuple[str | None, list[tuple[str, str]]] | None:
        """(content, [(name, arguments)]) when the text holds calls, else None."""
        if self.mode == "named":
            return None, [(self.forced_name, text)]
        if self.mode == "required":
            try:
                items = json.loads(text, strict=False)   # NOTE: xgrammar lets raw control characters into strings
            except json.JSONDecodeError:
                return None      # cut short (finish_reason "length"): returned as content
            calls = [(item["name"], json.dumps(item["arguments"], ensure_ascii=False)) for item in items]
            return None, calls
        if self.mode == "auto":
            parsed = self.parser.parse(text)
            if not parsed.calls:
                return None
            content = text[:text.find(self.parser.start)].rstrip() or None
            return content, parsed.calls if self.parallel else parsed.calls[:1]
        return None

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        found = self.calls(text) if self.mode != "none" else None
        if found is None:
            return {"role": "assistant", "content": text, "refusal": None}, finish_reason
        content, calls = found
        tool_calls = [{"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}
                      for name, args in calls]
        message = {"role": "assistant", "content": content, "refusal": None, "tool_calls": tool_calls}
        return message, _finish(finish_reason, bool(calls))

    def stream(self) -> "ChoiceStream":
        return ChoiceStream(self)


class ChoiceStream:
    """One choice of a stream: text deltas in, OpenAI `delta` objects out."""

    def __init__(self, owner: ToolCalls):
        self.owner = owner
        self.text = ""          # everything generated
        self.sent = 0           # chars of `text` sent as content
        self.call_id: str | None = None

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.text += text
        mode = self.owner.mode
        if mode == "none":
            self.sent = len(self.text)
            return [{"content": text}] if text else []
        if mode == "named":
            deltas = []
            if self.call_id is None:
                self.call_id = new_call_id()
                deltas.append({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                               "function": {"name": self.owner.forced_name, "arguments": ""}}]})
            if text:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return deltas
        if mode == "required":
            return []
        return self._auto_content()

    def _auto_content(self) -> list[dict[str, Any]]:
        """Content up to where a call could begin; trailing whitespace waits (dropped before a call)."""
        start = self.owner.parser.start
        end = self.text.find(start)
        if end < 0:
            end = len(self.text)
            # hold back a tail that could be the start of the marker
            for keep in range(min(len(start) - 1, len(self.text)), 0, -1):
                if start.startswith(self.text[-keep:]):
                    end -= keep
                    break
        end = len(self.text[:end].rstrip()) if end > self.sent else end
        if end <= self.sent:
            return []
        piece, self.sent = self.text[self.sent:end], end
        return [{"content": piece}]

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The deltas still owed once the choice is complete, and its finish_reason."""
        owner = self.owner
        if owner.mode in ("none", "named"):
            return [], _finish(finish_reason, owner.mode == "named")
        found = owner.calls(self.text)
        if found is None:
            rest = self.text[self.sent:]
            self.sent = len(self.text)
            return ([{"content": rest}] if rest else []), finish_reason
        deltas = []
        for index, (name, arguments) in enumerate(found[1]):
            deltas.append({"tool_calls": [{"index": index, "id": new_call_id(), "type": "function",
                                           "function": {"name": name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
        return deltas, _finish(finish_reason, True)
