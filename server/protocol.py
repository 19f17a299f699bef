"""Request models (pydantic) and their mapping onto SamplingParams.

NOTE: every model forbids unknown keys, so a field we do not know is a 400 that names it,
never silently ignored. Fields the OpenAI API has but this server cannot honour (audio,
legacy `functions`, ...) are declared so the SDK's requests parse, and then
`check_supported()` rejects any value other than their no-op one, naming the field.

Structured outputs: `response_format` (OpenAI's json_object / json_schema), the vLLM-style
`structured_outputs` extra (json, regex, choice, grammar, json_object) and forced tool choices
all become one `StructuredOutputs` spec on the SamplingParams; the tools themselves are
checked and rendered by server/tools/.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.structured.params import StructuredOutputs
from sparse_serve.server.errors import bad_request, model_not_found, unsupported

# OpenAI's rule for function and response-format names.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Strict):
    """vLLM's `structured_outputs` extra body object: exactly one of these."""
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def to_spec(self) -> StructuredOutputs:
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, "json_" if k == "json" else k) not in (None, False)]
        if len(given) != 1:
            raise bad_request("'structured_outputs' needs exactly one of 'json', 'regex', 'choice', "
                              f"'grammar', 'json_object' (got {given or 'none'}).", param="structured_outputs")
        kind = given[0]
        param = f"structured_outputs.{kind}"
        if kind == "json":
            schema = self.json_
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise bad_request(f"Invalid value for '{param}': not a JSON schema ({exc})",
                                      param=param) from None
            if not isinstance(schema, dict):
                raise bad_request(f"Invalid value for '{param}': a JSON schema must be an object.", param=param)
            return StructuredOutputs.json_schema(schema, param, label="json_schema")
        if kind == "json_object":
            return StructuredOutputs("json_object", "", param, "json_object")
        if kind == "choice":
            if not self.choice or any(not c for c in self.choice):
                raise bad_request(f"Invalid value for '{param}': give a non-empty list of non-empty strings.",
                                  param=param)
            return StructuredOutputs("choice", json.dumps(self.choice, ensure_ascii=False), param, "choice")
        value = getattr(self, kind)
        if not value:
            raise bad_request(f"Invalid value for '{param}': must not be empty.", param=param)
        return StructuredOutputs(kind, value, param, kind)


class FunctionDef(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None     # assistant messages
    tool_call_id: str | None = None              # tool messages
    # Declared only to be rejected by name (the legacy function-calling API).
    function_call: dict[str, Any] | None = None
    refusal: str | None = None

    def text(self, param: str) -> str:
        """The message's text; a list of parts must hold only text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for i, part in enumerate(self.content):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise unsupported(f"{param}.content.{i}",
                                  f"has type {kind!r}; only text content parts are supported")
            pieces.append(part["text"])
        return "".join(pieces)

    def to_template_dict(self, param: str) -> dict[str, Any]:
        """The message as chat templates read it. Tool calls keep OpenAI's shape, with the
        arguments parsed into an object (what tool-aware templates iterate over)."""
        if self.role == "function":
            raise unsupported(f"{param}.role", "'function' messages (the legacy function-calling API) "
                              "are not supported; use 'tool' messages")
        if self.function_call is not None:
            raise unsupported(f"{param}.function_call", "(the legacy function-calling API) is not "
                              "supported; use 'tool_calls'")
        if self.tool_calls and self.role != "assistant":
            raise bad_request(f"Invalid value for '{param}.tool_calls': only assistant messages carry tool calls.",
                              param=f"{param}.tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise bad_request(f"Missing required parameter: '{param}.tool_call_id'.", param=f"{param}.tool_call_id")
        message: dict[str, Any] = {"role": self.role, "content": self.text(param)}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for i, call in enumerate(self.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    raise bad_request(f"Invalid value for '{param}.tool_calls.{i}.function.arguments': "
                                      "not a JSON text.", param=f"{param}.tool_calls.{i}.function.arguments") from None
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        return message


class _SamplingFields(_Strict):
    """Fields chat and text completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM names), sent by the SDK through extra_body.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsRequest | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.",
                              param="stream_options")

    def _logit_bias(self) -> dict[int, float]:
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = float(value)
            except ValueError:
                raise bad_request(f"Invalid value for 'logit_bias': key {key!r} is not a token id.",
                                  param="logit_bias") from None
        return bias

    def structured_spec(self) -> StructuredOutputs | None:
        """What the output must match; chat adds response_format and forced tool calls."""
        return self.structured_outputs.to_spec() if self.structured_outputs is not None else None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self._logit_bias(),
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured=self.structured_spec(),
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    # NOTE: validated in _check_tools (a union here would name pydantic's union members in
    # the error's param instead of 'tool_choice').
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # Declared only so that their no-op values pass; anything else is a 400 naming the field.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None

    def check_supported(self) -> None:
        self._check_common()
        if self.functions:
            raise unsupported("functions", "(the legacy function-calling API) is not supported; use 'tools'")
        if self.function_call not in (None, "none"):
            raise unsupported("function_call", "(the legacy function-calling API) is not supported; "
                              "use 'tool_choice'")
        self._check_tools()
        if self.constrained_format is not None and self.structured_outputs is not None:
            raise bad_request("Give either 'response_format' or 'structured_outputs', not both.",
                              param="structured_outputs")
        if self.tool_mode in ("required", "named") and (self.constrained_format or self.structured_outputs):
            raise bad_request(f"A forced tool call (tool_choice {self.tool_mode!r}) already constrains the "
                              "output; it cannot be combined with 'response_format' or 'structured_outputs'.",
                              param="tool_choice")
        if self.tool_mode == "auto" and (self.constrained_format or self.structured_outputs):
            raise bad_request("'response_format' / 'structured_outputs' cannot be combined with tools "
                              "the model may call (tool_choice 'auto'); use tool_choice 'none' or "
                              "'required'.", param="response_format")
        if self.audio is not None:
            raise unsupported("audio")
        if self.modalities is not None and set(self.modalities) != {"text"}:
            raise unsupported("modalities", "other than ['text'] is not supported")
        for name in ("prediction", "reasoning_effort", "web_search_options"):
            if getattr(self, name) is not None:
                raise unsupported(name)
        if self.store:
            raise unsupported("store", "is not supported (completions are not stored)")
        if self.metadata:
            raise unsupported("metadata", "is only used with 'store', which is not supported")
        if self.service_tier not in (None, "auto", "default"):
            raise unsupported("service_tier", f"'{self.service_tier}' is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template_dict(f"messages.{i}") for i, m in enumerate(self.messages)]

    # ---- tools and structured outputs ---------------------------------------------------
    @property
    def tool_mode(self) -> str:
        """'none', 'auto', 'required' or 'named' (OpenAI: 'auto' when tools are given)."""
        if not self.tools:
            return "none"
        choice = self.tool_choice or "auto"
        return "named" if isinstance(choice, NamedToolChoice) else choice

    @property
    def constrained_format(self) -> ResponseFormat | None:
        rf = self.response_format
        return rf if rf is not None and rf.type != "text" else None

    def _check_tools(self) -> None:
        choice = self.tool_choice
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise bad_request(f"Invalid value for 'tool_choice': {choice!r}; use 'none', 'auto', 'required' or "
                              "{'type': 'function', 'function': {'name': ...}}.", param="tool_choice")
        if isinstance(choice, dict):
            try:
                self.tool_choice = NamedToolChoice.model_validate(choice)
            except ValueError as exc:
                raise bad_request(f"Invalid value for 'tool_choice': {exc.errors()[0]['msg']} "   # type: ignore[attr-defined]
                                  "(a named choice is {'type': 'function', 'function': {'name': ...}}).",
                                  param="tool_choice") from None
        if self.tool_choice not in (None, "none") and not self.tools:
            raise bad_request("'tool_choice' needs 'tools'.", param="tool_choice")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise bad_request("Invalid value for 'tools': function names must be unique.", param="tools")
        for i, tool in enumerate(self.tools or ()):
            params = tool.function.parameters
            if params is not None and params.get("type", "object") != "object":
                raise bad_request(f"Invalid value for 'tools.{i}.function.parameters': must be a JSON "
                                  "schema of type 'object'.", param=f"tools.{i}.function.parameters")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise bad_request(f"Invalid value for 'tool_choice': no tool is named "
                              f"{self.tool_choice.function.name!r}.", param="tool_choice")

    def forced_tool(self) -> ToolDef | None:
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            return next(t for t in self.tools if t.function.name == self.tool_choice.function.name)
        return None

    def structured_spec(self) -> StructuredOutputs | None:
        mode = self.tool_mode
        if mode == "named":
            return StructuredOutputs.json_schema(tool_parameters(self.forced_tool()), "tool_choice", "tool_call")
        if mode == "required":
            return StructuredOutputs.json_schema(
                required_calls_schema(self.tools or [], self.parallel_tool_calls is not False),
                "tools", "tool_call")
        rf = self.constrained_format
        if rf is None:
            return super().structured_spec()
        if rf.type == "json_object":
            return StructuredOutputs("json_object", "", "response_format", "json_object")
        if rf.json_schema is None:
            raise bad_request("Missing required parameter: 'response_format.json_schema'.",
                              param="response_format.json_schema")
        if rf.json_schema.schema_ is None:
            raise bad_request("Missing required parameter: 'response_format.json_schema.schema'.",
                              param="response_format.json_schema.schema")
        return StructuredOutputs.json_schema(rf.json_schema.schema_, "response_format.json_schema.schema",
                                             "json_schema")

    def to_sampling_params(self) -> SamplingParams:
        # NOTE: max_completion_tokens is the newer name; it wins when both are given.
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


PromptType = str | list[int] | list[list[int]] | list[str]


def tool_parameters(tool: ToolDef) -> dict[str, Any]:
    """The schema of a function's arguments (no schema: any object)."""
    return tool.function.parameters or {"type": "object", "properties": {}}


def required_calls_schema(tools: list[ToolDef], parallel: bool) -> dict[str, Any]:
    """tool_choice 'required': a JSON list of one or more {"name", "arguments"} objects, each
    naming a tool and holding arguments that match that tool's schema."""
    options = [{"type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": tool_parameters(t)},
                "required": ["name", "arguments"], "additionalProperties": False}
               for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: int | None = 16            # OpenAI's default for text completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    # Extension: text prompts are plain text, so a control token's text in them is characters;
    # true parses it into the control token (for callers that render their own templates).
    parse_special_tokens: bool = False

    def check_supported(self) -> None:
        self._check_common()
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "other than n is not supported")
        if self.suffix:
            raise unsupported("suffix", "(insertion) is not supported")
        if self.echo and self.logprobs is not None:
            raise unsupported("logprobs", "together with 'echo' (prompt logprobs) is not supported")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise bad_request("'prompt' must not be empty.", param="prompt")
        return prompts

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    parse_special_tokens: bool = False   # as in CompletionRequest (prompt only)

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("Give exactly one of 'prompt' and 'messages'.", param="prompt")


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def check_model(requested: str | None, served: str) -> None:
    """An unknown model name is a 404, as OpenAI answers it; no name means the served one."""
    if requested is not None and requested != served:
        raise model_not_found(requested)
