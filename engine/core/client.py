"""The typed seam between the HTTP server and the engine (vLLM's EngineClient).

The server depends on `EngineClient`, never on the engine class. What crosses the seam is an
`EngineRequest` that the input processor built: rendered, tokenized and validated once, with a
SamplingParams object of its own, so the engine trusts it and never mutates the caller's.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from sparse_serve.engine.core.input_processor import EngineRequest, InputProcessor
from sparse_serve.engine.core.outputs import EngineStats, RequestOutput, StepStats

__all__ = ["EngineClient", "EngineRequest"]


class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    total_params: int
    num_layers: int
    processor: InputProcessor
    step_listeners: list[Callable[[StepStats], None]]
    request_listeners: list[Callable[[RequestOutput], None]]
    death_listeners: list[Callable[[str], None]]

    @property
    def dead_reason(self) -> str | None:
        """Why the engine stopped for good (None while it runs): /health answers 503 then."""

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; refuses (EngineOverloadedError, EngineDeadError) before the
        first yield, and aborts the request when closed early."""

    async def abort(self, request_id: str) -> None: ...

    def get_stats(self) -> EngineStats: ...
