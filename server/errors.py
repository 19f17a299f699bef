"""OpenAI error objects: one exception type, one JSON shape, one mapping from engine errors.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}`, whether it
comes from validation, auth, the body-size limit, the engine, or an unexpected bug (500, no
traceback in the body: the traceback goes to the log with the request id).
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparse_serve.engine.core.errors import (
    EngineDeadError,
    EngineOverloadedError,
    PromptTooLongError,
    RequestFailedError,
)

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RETRY_AFTER_S = 1  # NOTE: a queue drains in about a second at typical batch sizes; clients back off from there


class OpenAIError(Exception):
    """An error the server answers on purpose; routes raise it, handlers render it."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _EscapedJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error may quote the request's own text,
    which can hold lone surrogates that UTF-8 cannot encode (JSON's \\uXXXX escapes can)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(err: OpenAIError) -> JSONResponse:
    return _EscapedJSONResponse(err.body(), status_code=err.status, headers=err.headers)


def error_bytes(err: OpenAIError) -> bytes:
    return json.dumps(err.body()).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unsupported(param: str, why: str = "is not supported by this server") -> OpenAIError:
    return OpenAIError(400, f"'{param}' {why}", param=param, code="unsupported_parameter")


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", param="model",
                       code="model_not_found")


def internal_error(request_id: str | None) -> OpenAIError:
    suffix = f" (request id {request_id})" if request_id else ""
    return OpenAIError(500, f"Internal server error{suffix}", type=SERVER_ERROR, code="internal_error")


_PARAM_IN_MESSAGE = re.compile(r"'([A-Za-z_][A-Za-z0-9_.]*)'")


def from_engine_error(exc: BaseException, request_id: str | None = None) -> OpenAIError:
    """Map whatever `engine.generate` raised onto the one HTTP answer for it."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        return OpenAIError(429, f"The server is overloaded: {exc}", type="rate_limit_exceeded",
                           code="engine_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, PromptTooLongError):
        return OpenAIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, "The inference engine is not running.", type=SERVER_ERROR,
                           code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return internal_error(request_id)
    if isinstance(exc, ValueError):
        # The input processor names the field as 'name'; surface it as `param`.
        match = _PARAM_IN_MESSAGE.search(str(exc))
        return bad_request(str(exc), param=match.group(1) if match else None)
    return internal_error(request_id)


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request body.")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"Request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if not loc:
        # NOTE: the body as a whole is wrong: FastAPI only parses JSON when the Content-Type
        # says so, and `curl -d` sends a form type unless told otherwise.
        if kind == "missing":
            return bad_request("The request body is empty; send a JSON object.")
        return bad_request("The request body must be a JSON object, sent with "
                           "'Content-Type: application/json'.", code="invalid_body")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param,
                           code="unsupported_parameter")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    message = str(first.get("msg", "invalid value"))
    # NOTE: pydantic's ValueError messages from our own validators start with "Value error, ".
    message = message.removeprefix("Value error, ")
    return bad_request(f"Invalid value for '{param}': {message}" if param else message, param=param)


def install_handlers(app: FastAPI) -> None:
    """Validation errors become 400 (not FastAPI's 422); HTTP errors keep their status."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = OpenAIError(exc.status_code, str(exc.detail), code=code,
                          headers=dict(exc.headers or {}))
        return error_response(err)
