"""POST /v1/chat/completions: request -> prompt ids via the chat template -> engine -> response.

Tools (server/tools/) shape the prompt (the template's `tools=`, or the text fallback) and
the answer (`tool_calls`, finish_reason "tool_calls"); a forced tool call or a response_format
reaches the engine as a grammar (server/inputs.py compiles it).
"""
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
from sparse_serve.server.tools.calls import ToolCalls
from sparse_serve.server.tools.parsers import get_parser
from sparse_serve.server.tools.prompt import prompt_messages

logger = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    engine, params = await accept_request(body, request)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    parser = get_parser(get_state(request).config.server.tool_call_parser)
    messages, tools = prompt_messages(body, engine.processor.tokenizer.template_supports_tools, parser)
    engine_request = await process(engine, engine.processor.chat_request, messages, params, request_id,
                                   tools=tools)
    forced = body.forced_tool()
    tool_calls = ToolCalls(body.tool_mode, parser, forced.function.name if forced else None,
                           parallel=body.parallel_tool_calls is not False)
    head = {"id": request_id, "created": int(time.time()), "model": engine.model_name}
    if body.stream:
        merged = await get_state(request).runner.open(request.receive, [engine_request], request_id)
        events = _chat_events(merged, head, params.n, bool(body.logprobs), body.include_usage,
                              engine.total_params, tool_calls)
        return SSEResponse(events, request_id, on_close=merged.aclose)

    results = await get_state(request).runner.collect(request.receive, [engine_request], request_id)
    result = results[0]
    choices = []
    for i, choice in enumerate(result.choices):
        message, finish_reason = tool_calls.message(choice.text, choice.finish_reason)
        choices.append({
            "index": i,
            "message": message,
            "logprobs": chat_logprobs(choice.logprobs) if body.logprobs else None,
            "finish_reason": finish_reason,
        })
    return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                         "usage": usage(results, engine.total_params)})


async def _chat_events(merged: MergedStream, head: dict[str, Any], n: int,
                       want_logprobs: bool, include_usage: bool, total_params: int,
                       tool_calls: ToolCalls) -> AsyncIterator[bytes]:
    """chat.completion.chunk events: a role chunk per choice, content (or tool-call) chunks, a
    chunk with finish_reason per choice, then (include_usage) one chunk with empty choices and
    usage. `merged` belongs to the SSEResponse, which closes it (aborting what is left) at the end."""
    base = {**head, "object": "chat.completion.chunk"}
    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse_data({**base, "choices": [choice]})

    result = PromptResult([], [])
    streams = [tool_calls.stream() for _ in range(n)]
    # NOTE: an answer that is a forced tool call has no content (null, as OpenAI sends it).
    first_content = None if tool_calls.mode in ("named", "required") else ""
    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": first_content})
    async for _, out in merged:
        for delta in out.outputs:
            logprobs = chat_logprobs(delta.logprobs) if want_logprobs else None
            pieces = streams[delta.index].feed(delta.text) if delta.text else []
            for i, piece in enumerate(pieces):
                yield chunk(delta.index, piece, logprobs if i == len(pieces) - 1 else None)
            if logprobs and not pieces:
                yield chunk(delta.index, {} if tool_calls.mode != "none" else {"content": ""}, logprobs)
            if delta.finish_reason is not None:
                owed, finish_reason = streams[delta.index].finish(delta.finish_reason)
                for piece in owed:
                    yield chunk(delta.index, piece)
                yield chunk(delta.index, {}, finish=finish_reason)
        if out.stats is not None:
            result.stats = out.stats
        if not result.prompt_token_ids:
            result.prompt_token_ids = list(out.prompt_token_ids)
    if include_usage:
        yield sse_data({**base, "choices": [], "usage": usage([result], total_params)})
