"""The small endpoints: models, health, metrics, tokenize/detokenize, version."""
from __future__ import annotations

import time
from importlib import metadata

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sparse_serve.server.errors import bad_request
from sparse_serve.server.protocol import DetokenizeRequest, TokenizeRequest, check_model
from sparse_serve.server.routes_chat import chat_prompt_ids
from sparse_serve.server.state import get_state

router = APIRouter()
_STARTED = int(time.time())


def _version() -> str:
    try:
        return metadata.version("sparse-serve")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def _model_card(engine) -> dict:
    return {"id": engine.model_name, "object": "model", "created": _STARTED,
            "owned_by": "sparse-serve", "root": engine.model_name,
            "max_model_len": engine.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    engine = get_state(request).ready_engine()
    return JSONResponse({"object": "list", "data": [_model_card(engine)]})


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> JSONResponse:
    engine = get_state(request).ready_engine()
    check_model(model, engine.model_name)
    return JSONResponse(_model_card(engine))


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 once the model is loaded and the engine started; 503 while loading or draining."""
    state = get_state(request)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if state.engine is None:
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503)
    return JSONResponse({"status": "ok", "model": state.engine.model_name})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = get_state(request)
    if state.metrics is None or state.engine is None:
        return Response("# model is loading\n", status_code=503, media_type="text/plain")
    state.metrics.update_engine_stats(state.engine.get_stats())
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": _version()})


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    engine = get_state(request).ready_engine()
    check_model(body.model, engine.model_name)
    body.check()
    if body.messages is not None:
        messages = [m.to_template_dict(f"messages.{i}") for i, m in enumerate(body.messages)]
        if body.add_generation_prompt:
            token_ids = chat_prompt_ids(engine, messages)
        else:
            # NOTE: without the generation prompt, render the template text and encode it
            # without adding special tokens again (the template writes its own).
            if not engine.tokenizer.has_chat_template:
                raise bad_request("This model has no chat template.", param="messages",
                                  code="no_chat_template")
            try:
                text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
            except ValueError as exc:
                raise bad_request(f"The chat template could not render these messages: {exc}",
                                  param="messages") from None
            token_ids = engine.tokenizer.encode(text, add_special_tokens=False)
    else:
        token_ids = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return JSONResponse({"count": len(token_ids), "max_model_len": engine.max_model_len,
                         "tokens": list(token_ids)})


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    engine = get_state(request).ready_engine()
    check_model(body.model, engine.model_name)
    vocab_size = engine.tokenizer.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"Token ids {bad[:5]} are outside the vocabulary (size {vocab_size}).",
                          param="tokens")
    return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens)})
