"""Tools and tool-call history in the prompt.

A template that reads `tools` (Hermes, Qwen, Llama 3.1, Mistral, ... templates) gets them as
the OpenAI tool objects, and assistant `tool_calls` / `tool` messages as they are: the model
sees the format it was trained on.

Fallback for templates without tool support (SmolLM2-135M-Instruct's, the embedded default,
is one): the tools and how to call them go into the system message, written in the format
of the configured --tool-call-parser; an assistant message's calls are appended to its text
in that same format; a `tool` message becomes a user message
`<tool_response name="...">...</tool_response>` (templates without tool support often refuse
the `tool` role).
"""
from __future__ import annotations

import json
from typing import Any

from sparse_serve.server.protocol import ChatCompletionRequest


def tool_objects(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    return [tool.model_dump(exclude_none=True, by_alias=True) for tool in body.tools or ()]


def prompt_messages(body: ChatCompletionRequest, template_supports_tools: bool,
                    parser) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools for the template's `tools=` or None) for the chat template."""
    messages = body.template_messages()
    tools = tool_objects(body)
    has_history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if template_supports_tools or not (tools or has_history):
        return messages, (tools or None)
    return _fallback(messages, tools, parser), None


def _fallback(messages: list[dict[str, Any]], tools: list[dict[str, Any]], parser) -> list[dict[str, Any]]:
    names = {}   # tool_call_id -> function name, to label tool responses
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.get("tool_calls"):
            rendered = []
            for call in message["tool_calls"]:
                names[call["id"]] = call["function"]["name"]
                arguments = json.dumps(call["function"]["arguments"], ensure_ascii=False)
                rendered.append(parser.render_call(call["function"]["name"], arguments))
            text = "\n".join(filter(None, [message["content"], *rendered]))
            out.append({"role": "assistant", "content": text})
        elif message["role"] == "tool":
            name = names.get(message.get("tool_call_id"), message.get("name") or "")
            out.append({"role": "user",
                        "content": f"<tool_response name={json.dumps(name)}>\n{message['content']}\n</tool_response>"})
        else:
            out.append({k: v for k, v in message.items() if k in ("role", "content", "name")})
    if tools:
        instructions = parser.instructions(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{instructions}"}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out
