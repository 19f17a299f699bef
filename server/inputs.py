"""From a request body to engine requests: the checks every generation route makes first, the
structured-output grammar compiled (off the event loop and the engine), and the input
processor's work run off the event loop, with their errors as OpenAI 400s."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request

from sparse_serve.engine.core.client import EngineClient
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.text.tokenizer import ChatTemplateError
from sparse_serve.server.errors import bad_request, from_engine_error
from sparse_serve.server.protocol import check_model
from sparse_serve.server.state import get_state

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def accept_request(body: Any, request: Request) -> tuple[EngineClient, SamplingParams]:
    """Engine ready, model name, supported fields, the output grammar compiled; returns
    (engine, params) or raises an OpenAI error. The params are validated by the input
    processor, with the prompt."""
    state = get_state(request)
    engine = state.ready_engine()
    check_model(body.model, engine.model_name)
    body.check_supported()
    params = body.to_sampling_params()
    if body.user:   # OpenAI's end-user id: for abuse tracing, so it goes to the log
        logger.info("%s request from user %r", request.url.path, body.user)
    if params.structured is not None:
        try:
            params.validate(engine.processor.vocab_size)   # before paying for a compile
            compiled = await engine.processor.grammars.compile(params.structured)
        except ValueError as exc:
            raise from_engine_error(exc) from None
        # NOTE: `params` is this request's own object (fresh from its body); the processor
        # copies it, grammar included, into the engine request.
        params.grammar = compiled.grammar
        if state.metrics is not None:
            state.metrics.observe_structured(params.structured.metric_kind,
                                             None if compiled.cached else compiled.seconds)
    return engine, params


async def process(engine: EngineClient, fn: Callable[..., T], *args, **kwargs) -> T:
    """`engine.processor.<fn>(...)` on the processor's thread; a bad input is a 400."""
    try:
        return await engine.processor.run(fn, *args, **kwargs)
    except ChatTemplateError as exc:
        if not engine.processor.tokenizer.has_chat_template:
            raise bad_request("This model has no chat template; start the server with "
                              "--chat-template FILE, or use /v1/completions.",
                              param="messages", code="no_chat_template") from None
        raise bad_request(f"The chat template could not render these messages: {exc}",
                          param="messages", code="chat_template_error") from None
    except ValueError as exc:
        raise from_engine_error(exc) from None
