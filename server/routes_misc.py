"""The small endpoints: models, health, metrics, tokenize/detokenize, version."""
from __future__ import annotations

import time
from importlib import metadata

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sparse_serve.server.inputs import process
from sparse_serve.server.protocol import DetokenizeRequest, TokenizeRequest, check_model
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
    """200 once the model is loaded and the engine started; 503 while loading, draining, or
    once the engine has stopped for good (a replica to restart: see docs/DEPLOY.md)."""
    state = get_state(request)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if state.engine is None:
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503)
    if state.engine.dead_reason is not None:
        return JSONResponse({"status": "dead", "reason": state.engine.dead_reason}, status_code=503)
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
    processor = engine.processor
    if body.messages is not None:
        messages = [m.to_template_dict(f"messages.{i}") for i, m in enumerate(body.messages)]
        token_ids = await process(engine, processor.chat_prompt_ids, messages, body.add_generation_prompt)
    else:
        token_ids = await process(engine, processor.encode, body.prompt, body.add_special_tokens,
                                  body.parse_special_tokens)
    return JSONResponse({"count": len(token_ids), "max_model_len": engine.max_model_len,
                         "tokens": list(token_ids)})


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    engine = get_state(request).ready_engine()
    check_model(body.model, engine.model_name)
    return JSONResponse({"prompt": await process(engine, engine.processor.decode, body.tokens)})
