"""Pure-ASGI middleware (outermost first): request context, API-key auth, body-size limit.

NOTE: plain ASGI rather than Starlette's BaseHTTPMiddleware, which wraps `receive` in a way
that hides `http.disconnect` from the routes; disconnect detection must see it.
"""
from __future__ import annotations

import hmac
import logging
import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sparse_serve.server.errors import OpenAIError, error_response, internal_error
from sparse_serve.server.state import ServerState

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
OPEN_PATHS = frozenset({"/health", "/metrics"})
_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                     "/tokenize", "/detokenize", "/version"})
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def route_label(path: str) -> str:
    """A bounded set of metric labels: the route templates, or "other"."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class RequestContextMiddleware:
    """Gives every request an id (the client's x-request-id when it is sane), echoes it on
    every response, turns an unhandled exception into a logged 500 without a traceback in the
    body, and counts responses by route and status."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_id = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = client_id if client_id and _CLIENT_ID.match(client_id) else uuid.uuid4().hex
        scope["request_id"] = request_id
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"))
            if not started:
                await error_response(internal_error(request_id))(scope, receive, send_with_id)
        finally:
            if self.state.metrics is not None:
                self.state.metrics.observe_http(route_label(scope.get("path", "")), status)


class AuthMiddleware:
    """Bearer API keys, compared in constant time; /health and /metrics stay open."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]

    def _authorized(self, scope: Scope) -> bool | None:
        """True if the key matches, False if wrong, None if missing."""
        header = Headers(scope=scope).get("authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        candidate = token.strip().encode()
        # NOTE: compare against every key without short-circuiting, so timing reveals
        # neither the key nor which of several keys came closest.
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        verdict = self._authorized(scope)
        if verdict:
            await self.app(scope, receive, send)
            return
        message = ("You didn't provide an API key; send it as 'Authorization: Bearer KEY'."
                   if verdict is None else "Incorrect API key provided.")
        err = OpenAIError(401, message, code="invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})
        await error_response(err)(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`, by Content-Length up front or by counting a chunked
    body; the body is buffered and replayed, then `receive` passes through (disconnects)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> OpenAIError:
        return OpenAIError(413, f"Request body is larger than the limit of {self.max_bytes} bytes.",
                           code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.isdigit():
                err = OpenAIError(400, "Invalid Content-Length header.", code="invalid_request")
                await error_response(err)(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await error_response(self._too_large())(scope, receive, send)
                return
        buffered: list[Message] = []
        total = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                await error_response(self._too_large())(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            if buffered:
                return buffered.pop(0)
            return await receive()

        await self.app(scope, replay, send)
