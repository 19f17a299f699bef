"""Request models (pydantic) and their mapping onto SamplingParams.

NOTE: every model forbids unknown keys, so a field we do not know is a 400 that names it,
never silently ignored. Fields the OpenAI API has but this server cannot honour (tools,
response_format other than text, ...) are declared so the SDK's requests parse, and then
`check_supported()` rejects any value other than their no-op one, naming the field.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.server.errors import bad_request, model_not_found, unsupported


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # Declared only to be rejected by name (tool use is not supported).
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
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

    def to_template_dict(self, param: str) -> dict[str, str]:
        if self.role in ("tool", "function"):
            raise unsupported(f"{param}.role", f"'{self.role}' messages need tool use, which is not supported")
        for field in ("tool_calls", "tool_call_id", "function_call"):
            if getattr(self, field) is not None:
                raise unsupported(f"{param}.{field}")
        message = {"role": self.role, "content": self.text(param)}
        if self.name is not None:
            message["name"] = self.name
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
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Declared only so that their no-op values pass; anything else is a 400 naming the field.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
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
        if self.tools:
            raise unsupported("tools")
        if self.tool_choice not in (None, "none"):
            raise unsupported("tool_choice", "other than 'none' is not supported (no tool use)")
        if self.functions:
            raise unsupported("functions")
        if self.function_call not in (None, "none"):
            raise unsupported("function_call", "other than 'none' is not supported (no tool use)")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise unsupported("response_format", "other than {'type': 'text'} is not supported")
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

    def template_messages(self) -> list[dict[str, str]]:
        return [m.to_template_dict(f"messages.{i}") for i, m in enumerate(self.messages)]

    def to_sampling_params(self) -> SamplingParams:
        # NOTE: max_completion_tokens is the newer name; it wins when both are given.
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


PromptType = str | list[int] | list[list[int]] | list[str]


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
