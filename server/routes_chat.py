"""POST /v1/chat/completions: request -> prompt ids via the chat template -> engine -> response."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sparse_serve.server.generation import MergedStream, PromptResult
from sparse_serve.server.inputs import accept_request, process
from sparse_serve.server.protocol import ChatCompletionRequest
from sparse_serve.server.render import chat_logprobs, usage
from sparse_serve.server.sse import SSEResponse, sse_data
from sparse_serve.server.state import get_state

logger = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    engine, params = accept_request(body, request)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    engine_request = await process(engine, engine.processor.chat_request, body.template_messages(),
                                   params, request_id)
    head = {"id": request_id, "created": int(time.time()), "model": engine.model_name}
    if body.stream:
        merged = await get_state(request).runner.open(request.receive, [engine_request], request_id)
        events = _chat_events(merged, head, params.n, bool(body.logprobs), body.include_usage,
                              engine.total_params)
        return SSEResponse(events, request_id, on_close=merged.aclose)

    results = await get_state(request).runner.collect(request.receive, [engine_request], request_id)
    result = results[0]
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": choice.text, "refusal": None},
            "logprobs": chat_logprobs(choice.logprobs) if body.logprobs else None,
            "finish_reason": choice.finish_reason,
        }
        for i, choice in enumerate(result.choices)
    ]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                         "usage": usage(results, engine.total_params)})


async def _chat_events(merged: MergedStream, head: dict[str, Any], n: int,
                       want_logprobs: bool, include_usage: bool, total_params: int,
                       ) -> AsyncIterator[bytes]:
    """chat.completion.chunk events: a role chunk per choice, content chunks, a chunk with
    finish_reason per choice, then (include_usage) one chunk with empty choices and usage.
    `merged` belongs to the SSEResponse, which closes it (aborting what is left) at the end."""
    base = {**head, "object": "chat.completion.chunk"}
    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse_data({**base, "choices": [choice]})

    result = PromptResult([], [])
    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": ""})
    async for _, out in merged:
        for delta in out.outputs:
            logprobs = chat_logprobs(delta.logprobs) if want_logprobs else None
            if delta.text or logprobs:
                yield chunk(delta.index, {"content": delta.text}, logprobs)
            if delta.finish_reason is not None:
                yield chunk(delta.index, {}, finish=delta.finish_reason)
        if out.stats is not None:
            result.stats = out.stats
        if not result.prompt_token_ids:
            result.prompt_token_ids = list(out.prompt_token_ids)
    if include_usage:
        yield sse_data({**base, "choices": [], "usage": usage([result], total_params)})

