"""Tool calling: the per-family parsers, the prompt (template `tools=` or the text fallback),
and the answer's tool_calls, whole and streamed."""
from __future__ import annotations

import json

import pytest

from sparse_serve.server.protocol import ChatCompletionRequest
from sparse_serve.server.tools.calls import ToolCalls
from sparse_serve.server.tools.parsers import PARSERS, get_parser
from sparse_serve.server.tools.prompt import prompt_messages

ARGS = '{"city": "Paris", "days": 2}'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.mark.parametrize("parser, text, content, names", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": ' + ARGS + '}\n</tool_call>',
     "Sure.", ["get_weather"]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", '
     '"arguments": {"x": 1}}</tool_call>', None, ["a", "b"]),
    ("hermes", "<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
    ("hermes", "no calls here", "no calls here", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + ARGS + '}]', None, ["get_weather"]),
    ("mistral", "[TOOL_CALLS] nope", "[TOOL_CALLS] nope", []),
    ("llama3_json", '{"name": "get_weather", "parameters": ' + ARGS + '}', None, ["get_weather"]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}',
     None, ["a", "b"]),
    ("llama3_json", "The answer is {x}", "The answer is {x}", []),
])
def test_parsers(parser, text, content, names):
    parsed = get_parser(parser).parse(text)
    assert parsed.content == content
    assert [name for name, _ in parsed.calls] == names
    for _, arguments in parsed.calls:
        assert isinstance(json.loads(arguments), dict)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_each_parser_reads_what_it_renders(name):
    parser = get_parser(name)
    parsed = parser.parse(parser.render_call("get_weather", ARGS))
    assert parsed.calls == [("get_weather", json.dumps(json.loads(ARGS)))]


def test_unknown_parser_is_named():
    with pytest.raises(ValueError, match="nope"):
        get_parser("nope")


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def test_fallback_prompt_for_templates_without_tools():
    body = ChatCompletionRequest(messages=HISTORY, tools=TOOLS)
    messages, tools = prompt_messages(body, template_supports_tools=False, parser=get_parser("hermes"))
    assert tools is None
    assert messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    assert "<tool_call>" in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": get_parser("hermes").render_call(
        "get_weather", json.dumps(json.loads(ARGS)))}
    assert messages[3] == {"role": "user",
                           "content": '<tool_response name="get_weather">\nsunny, 21 C\n</tool_response>'}


def test_tool_aware_templates_get_tools_and_history_as_is():
    body = ChatCompletionRequest(messages=HISTORY, tools=TOOLS)
    messages, tools = prompt_messages(body, template_supports_tools=True, parser=get_parser("hermes"))
    assert tools == TOOLS
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == json.loads(ARGS)   # an object
    assert messages[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"}


def test_tool_aware_template_renders_tools(tmp_path):
    from sparse_serve.engine.core.input_processor import InputProcessor
    from sparse_serve.engine.text.tokenizer import Tokenizer
    from tests.tiny_checkpoint import write_tokenizer

    template = ("{% for t in tools or [] %}[TOOL {{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
                "{% for c in m.tool_calls or [] %}(call {{ c.function.name }} {{ c.function.arguments.city }})"
                "{% endfor %}{% endfor %}")
    write_tokenizer(tmp_path, template)
    tokenizer = Tokenizer.from_pretrained(str(tmp_path))
    assert tokenizer.template_supports_tools
    body = ChatCompletionRequest(messages=HISTORY, tools=TOOLS)
    messages, tools = prompt_messages(body, tokenizer.template_supports_tools, get_parser("hermes"))
    processor = InputProcessor(tokenizer, 4096)
    text = tokenizer.decode(processor.chat_prompt_ids(messages, tools=tools), skip_special_tokens=False)
    assert "[TOOL get_weather]" in text and "(call get_weather Paris)" in text and "<tool>sunny" in text


@pytest.mark.parametrize("mode, text", [
    ("auto", "Let me check.  \n<tool_call>{\"name\": \"get_weather\", \"arguments\": " + ARGS + "}</tool_call>"),
    ("auto", "Just text, with a < sign and <tool but no call."),
    ("auto", "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par"),
    ("required", '[{"name": "get_weather", "arguments": ' + ARGS + '}]'),
    ("required", '[{"name": "get_weather", "argu'),
    ("named", ARGS),
    ("none", "plain"),
])
@pytest.mark.parametrize("finish", ["stop", "length"])
def test_streamed_deltas_reassemble_to_the_whole_message(mode, text, finish):
    shaper = ToolCalls(mode, get_parser("hermes"), "get_weather")
    message, whole_finish = shaper.message(text, finish)
    stream = shaper.stream()
    deltas = []
    for i in range(0, len(text), 3):                   # 3-character pieces
        deltas += stream.feed(text[i:i + 3])
    owed, stream_finish = stream.finish(finish)
    deltas += owed
    content = "".join(d.get("content") or "" for d in deltas) or None
    calls: dict[int, dict] = {}
    for d in deltas:
        for call in d.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
            entry["id"] = entry["id"] or call.get("id")
            entry["name"] += call.get("function", {}).get("name", "")
            entry["arguments"] += call.get("function", {}).get("arguments", "")
    whole_content = message["content"] or None
    assert content == whole_content
    assert stream_finish == whole_finish
    whole_calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == whole_calls
    assert all(c["id"].startswith("call_") for c in calls.values())
    if whole_calls and finish == "stop":
        assert whole_finish == "tool_calls"
