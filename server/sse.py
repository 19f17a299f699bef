"""Server-sent events: `data: <json>\\n\\n` frames, a final `data: [DONE]`, and the rules for
errors and disconnects once the stream has started.

NOTE: this is a small ASGI response of its own rather than Starlette's StreamingResponse so
that the two things that matter here are explicit: an exception after the first byte becomes
an SSE error event followed by [DONE] (the status line is already sent), and a client that
disconnects closes the event generator at once, which aborts the engine request.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from sparse_serve.server.errors import from_engine_error
from sparse_serve.server.generation import wait_for_disconnect

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], request_id: str,
                 on_close: Callable[[], Awaitable[None]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.events = events
        self.on_close = on_close
        self.request_id = request_id
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                logger.info("request %s: client disconnected mid-stream; aborting", self.request_id)
        finally:
            for task in (pump, watcher):
                task.cancel()
            await asyncio.gather(pump, watcher, return_exceptions=True)
            await self.events.aclose()  # type: ignore[attr-defined]
            if self.on_close is not None:
                await self.on_close()

    async def _pump(self, send: Send) -> None:
        try:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except Exception as exc:
            err = from_engine_error(exc, self.request_id)
            logger.error("request %s failed mid-stream (%d)", self.request_id, err.status, exc_info=exc)
            await send({"type": "http.response.body", "body": sse_data(err.body()), "more_body": True})
        await send({"type": "http.response.body", "body": DONE, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
