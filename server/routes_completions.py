"""POST /v1/completions: one or several prompts (text or token ids), echo, integer logprobs.

With several prompts each runs as its own engine request (ids `<id>-<i>`); choice indexes
are `prompt_index * n + choice_index`, as OpenAI numbers them.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sparse_serve.engine.core.client import EngineClient
from sparse_serve.server.generation import MergedStream, PromptResult, engine_request_ids
from sparse_serve.server.inputs import accept_request, process
from sparse_serve.server.protocol import CompletionRequest
from sparse_serve.server.render import completion_logprobs, usage
from sparse_serve.server.sse import SSEResponse, sse_data
from sparse_serve.server.state import get_state

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    engine, params = await accept_request(body, request)
    prompts = body.prompts()
    request_id = f"cmpl-{uuid.uuid4().hex}"
    requests = await process(engine, engine.processor.completion_requests, prompts, params,
                             engine_request_ids(request_id, len(prompts)),
                             parse_special_tokens=body.parse_special_tokens)
    echo_texts = [await _prompt_text(engine, p) for p in prompts] if body.echo else None

    head = {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": engine.model_name}
    if body.stream:
        merged = await get_state(request).runner.open(request.receive, requests, request_id)
        events = _completion_events(merged, head, len(prompts), params.n, echo_texts,
                                    body.logprobs is not None, body.include_usage,
                                    engine.total_params)
        return SSEResponse(events, request_id, on_close=merged.aclose)

    results = await get_state(request).runner.collect(request.receive, requests, request_id)
    choices = []
    for p, result in enumerate(results):
        for i, choice in enumerate(result.choices):
            prefix = echo_texts[p] if echo_texts else ""
            choices.append({
                "index": p * params.n + i,
                "text": prefix + choice.text,
                "logprobs": completion_logprobs(choice.logprobs, 0) if body.logprobs is not None else None,
                "finish_reason": choice.finish_reason,
            })
    return JSONResponse({**head, "choices": choices, "usage": usage(results, engine.total_params)})


async def _prompt_text(engine: EngineClient, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else await process(engine, engine.processor.decode, prompt, "prompt")


async def _completion_events(merged: MergedStream, head: dict[str, Any], num_prompts: int,
                             n: int, echo_texts: list[str] | None, want_logprobs: bool,
                             include_usage: bool, total_params: int) -> AsyncIterator[bytes]:
    base = dict(head)
    if include_usage:
        base["usage"] = None

    def chunk(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse_data({**base, "choices": [choice]})

    results = [PromptResult([], []) for _ in range(num_prompts)]
    offsets = [0] * (num_prompts * n)     # text offset per choice, for streamed logprobs
    if echo_texts is not None:
        for p, text in enumerate(echo_texts):
            for i in range(n):
                yield chunk(p * n + i, text)
    async for p, out in merged:
        for delta in out.outputs:
            index = p * n + delta.index
            logprobs = completion_logprobs(delta.logprobs, offsets[index]) if want_logprobs else None
            offsets[index] += len(delta.text)
            if delta.text or logprobs or delta.finish_reason is not None:
                yield chunk(index, delta.text, logprobs, delta.finish_reason)
        if out.stats is not None:
            results[p].stats = out.stats
        if not results[p].prompt_token_ids:
            results[p].prompt_token_ids = list(out.prompt_token_ids)
    if include_usage:
        yield sse_data({**base, "choices": [], "usage": usage(results, total_params)})
