"""The one input processor: every request is rendered, tokenized and validated here, once,
before anything reaches the engine (vLLM's InputProcessor).

It turns prompts (text, token ids, or chat messages) into `EngineRequest`s, each with a
SamplingParams copy of its own (several prompts, or the n choices of one, never share an object
the engine could change). A bad request raises ValueError naming the field (the server's 400).

NOTE: the async methods run the work on one dedicated thread: chat templates and tokenization
stay off the event loop, and this processor's tokenizer is only ever used from that thread (an
HF tokenizer used from two threads at once fails with "Already borrowed"). The engine's step
thread detokenizes with a tokenizer instance of its own. Structured-output grammars compile on
`self.grammars`' own thread (engine/structured/compiler.py), awaited before the request is built.
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from sparse_serve.engine.core.errors import PromptTooLongError
from sparse_serve.engine.core.sampling_params import SamplingParams, check_text
from sparse_serve.engine.structured.compiler import GrammarCompiler
from sparse_serve.engine.text.tokenizer import ChatTemplateError, Tokenizer, load_eos_token_ids

T = TypeVar("T")
Prompt = str | list[int]


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.max_model_len = max_model_len
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="input-processor")
        # NOTE: the grammar's stop tokens are the engine's EOS ids (same sources: the model
        # folder's configs and the tokenizer), so a finished grammar ends the sequence as EOS does.
        self.grammars = GrammarCompiler(tokenizer.hf, load_eos_token_ids(tokenizer.hf.name_or_path, tokenizer))

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` on the processor's own thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.grammars.close()

    # ---- requests -------------------------------------------------------------------------
    def completion_requests(self, prompts: Sequence[Prompt], params: SamplingParams, request_ids: list[str],
                            *, parse_special_tokens: bool = False) -> list[EngineRequest]:
        """One request per prompt. Text prompts get the tokenizer's BOS; a control token's
        text in them is plain text unless `parse_special_tokens`."""
        params.validate(self.vocab_size)
        requests = []
        for i, (prompt, request_id) in enumerate(zip(prompts, request_ids, strict=True)):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            if isinstance(prompt, str):
                check_text(param, prompt)
                ids = self.tokenizer.encode(prompt, parse_special_tokens=parse_special_tokens)
            else:
                ids = list(prompt)
            requests.append(self._request(request_id, ids, params, param))
        return requests

    def chat_request(self, messages: list[dict], params: SamplingParams, request_id: str,
                     tools: list[dict] | None = None) -> EngineRequest:
        """`tools`: OpenAI tool objects for templates that read `tools` (else None)."""
        params.validate(self.vocab_size)
        return self._request(request_id, self.chat_prompt_ids(messages, tools=tools), params, "messages")

    def _request(self, request_id: str, ids: list[int], params: SamplingParams, param: str) -> EngineRequest:
        self.check_token_ids(param, ids)
        self.check_length(len(ids), params)
        # NOTE: the engine's own copy, with the budget resolved against this prompt.
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        copy = params.clone(max_tokens=max_tokens)
        if copy.structured is not None and copy.grammar is None:
            # NOTE: the server compiles on self.grammars' thread before this runs; callers that
            # did not (the offline LLM) compile here, never run a constrained request unconstrained.
            copy.grammar = self.grammars.compile_now(copy.structured).grammar
        return EngineRequest(request_id, ids, copy)

    # ---- text ---------------------------------------------------------------------------
    def chat_prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> list[int]:
        """Raises ChatTemplateError when the model has no template or it refuses the messages."""
        for i, message in enumerate(messages):
            _check_texts(f"messages.{i}", message)
        if tools:
            _check_texts("tools", tools)
        if not self.tokenizer.has_chat_template:
            raise ChatTemplateError("this model has no chat template")
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        except ChatTemplateError:
            raise
        except ValueError as exc:   # NOTE: what a template raises about the conversation itself
            raise ChatTemplateError(str(exc)) from exc

    def encode(self, text: str, add_special_tokens: bool = True, parse_special_tokens: bool = False) -> list[int]:
        check_text("prompt", text)
        return self.tokenizer.encode(text, add_special_tokens, parse_special_tokens=parse_special_tokens)

    def decode(self, ids: list[int], param: str = "tokens") -> str:
        self.check_token_ids(param, ids)
        return self.tokenizer.decode(ids)

    # ---- checks -------------------------------------------------------------------------
    def check_token_ids(self, param: str, ids: list[int]) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"Invalid value for '{param}': token id {bad} is outside the vocabulary "
                             f"(size {self.vocab_size})")

    def check_length(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        if num_prompt_tokens == 0:
            raise ValueError("Invalid value for 'prompt': the prompt is empty")
        wanted = num_prompt_tokens + (params.max_tokens or 1)
        if wanted > self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {wanted} tokens ({num_prompt_tokens} in the prompt, "
                f"{params.max_tokens or 1} for the completion). Please reduce the prompt or max_tokens.")
        room = self.max_model_len - num_prompt_tokens
        if params.min_tokens > room:
            raise ValueError(f"Invalid value for 'min_tokens': {params.min_tokens} tokens do not fit "
                             f"after a {num_prompt_tokens}-token prompt (context window {self.max_model_len})")


def _check_texts(param: str, value) -> None:
    """check_text on every string inside `value` (dicts and lists of them: tool calls, tools)."""
    if isinstance(value, str):
        check_text(param, value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_texts(f"{param}.{key}", item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_texts(f"{param}.{i}", item)
