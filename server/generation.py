"""Driving `engine.generate` for a route: admission, fan-in of several prompts, disconnects.

Contract with the engine: `generate()` is an async generator that validates before its first
yield (so priming it surfaces 400/429 before any byte of the response is sent) and aborts its
request when closed. On top of that this module calls `engine.abort(request_id)` for any
request it stops early, so a disconnected client never leaves KV blocks behind.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sparse_serve.engine.core.client import EngineClient, EngineRequest
from sparse_serve.engine.core.outputs import RequestOutput, RequestStats, TokenLogprob
from sparse_serve.server.errors import from_engine_error

logger = logging.getLogger(__name__)

T = TypeVar("T")
Receive = Callable[[], Awaitable[dict[str, Any]]]
Indexed = tuple[int, RequestOutput]   # (prompt index, delta)


class ClientDisconnected(Exception):
    """The HTTP client went away before the answer was ready."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has disconnected (the body must already have been read)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


async def until_disconnected(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` unless the client disconnects first; then cancel it and raise
    ClientDisconnected. Cancelling closes the engine generators inside, which aborts them."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected
    finally:
        for t in (task, watcher):
            t.cancel()
        # NOTE: wait for the cancellations to land so the aborts have happened on return.
        await asyncio.gather(task, watcher, return_exceptions=True)


@dataclass
class ChoiceResult:
    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


@dataclass
class PromptResult:
    prompt_token_ids: list[int]
    choices: list[ChoiceResult]
    stats: RequestStats | None = None


def engine_request_ids(base_id: str, num_prompts: int) -> list[str]:
    return [base_id] if num_prompts == 1 else [f"{base_id}-{i}" for i in range(num_prompts)]


class GenerationRunner:
    """One per app: starts generations and merges them (the engine reports finished ones to
    the metrics itself: AsyncEngine.request_listeners)."""

    def __init__(self, engine: EngineClient):
        self.engine = engine

    async def open(self, receive: Receive, requests: list[EngineRequest], base_id: str) -> "MergedStream":
        """Admit every request (raising the mapped OpenAIError if any is refused) and return
        one MergedStream; the caller must `aclose()` it (that aborts whatever is left)."""
        request_ids = [r.request_id for r in requests]
        gens = [self.engine.generate(r) for r in requests]
        try:
            firsts = await until_disconnected(receive, _prime_all(gens))
        except BaseException as exc:
            await self._close_all(gens, request_ids)
            if isinstance(exc, ClientDisconnected) or not isinstance(exc, Exception):
                raise
            err = from_engine_error(exc, base_id)
            if err.status >= 500:
                logger.error("request %s failed at admission", base_id, exc_info=exc)
            else:
                logger.info("request %s refused (%d): %s", base_id, err.status, err.message)
            raise err from exc
        return MergedStream(self, gens, firsts, request_ids)

    async def collect(self, receive: Receive, requests: list[EngineRequest], base_id: str) -> list[PromptResult]:
        """Run to completion (non-streaming), aborting if the client disconnects."""
        merged = await self.open(receive, requests, base_id)

        async def consume() -> list[PromptResult]:
            results = [PromptResult([], [ChoiceResult() for _ in range(r.params.n)]) for r in requests]
            async for index, out in merged:
                accumulate(results[index], out)
            return results

        try:
            return await until_disconnected(receive, consume())
        finally:
            await merged.aclose()

    async def _close_all(self, gens: list[AsyncIterator[RequestOutput]], request_ids: list[str]) -> None:
        """Close the engine generators (which aborts them) and abort by id as well."""
        for gen, rid in zip(gens, request_ids):
            await gen.aclose()  # type: ignore[attr-defined]
            await self.engine.abort(rid)

    async def _merge(self, streams: list[AsyncIterator[RequestOutput]],
                     finished_ids: set[str], request_ids: list[str]) -> AsyncIterator[Indexed]:
        if len(streams) == 1:
            async for item in self._pump_inline(streams[0], 0, finished_ids, request_ids[0]):
                yield item
            return
        # NOTE: several prompts run concurrently in the engine; one task per prompt feeds a
        # queue so deltas reach the client in the order the engine produced them.
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for item in self._pump_inline(streams[index], index, finished_ids,
                                                    request_ids[index]):
                    queue.put_nowait(item)
                queue.put_nowait((index, None))
            except Exception as exc:  # handed to the consumer, which re-raises it
                queue.put_nowait((index, exc))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
        try:
            remaining = len(streams)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump_inline(self, stream: AsyncIterator[RequestOutput], index: int,
                           finished_ids: set[str], request_id: str) -> AsyncIterator[Indexed]:
        async with aclosing(stream):  # type: ignore[type-var]
            async for out in stream:
                if out.finished:
                    finished_ids.add(request_id)
                yield index, out


class MergedStream:
    """The admitted generations as one async iterator of (prompt index, delta).

    NOTE: `aclose()` is the one place that releases engine requests, and it works whether or
    not iteration ever started (a lazy generator that never ran has nothing to clean up, so
    it cannot be trusted with this): it closes the engine generators, which aborts them, and
    aborts by id every request that had not finished.
    """

    def __init__(self, runner: GenerationRunner, gens: list[AsyncIterator[RequestOutput]],
                 firsts: list[RequestOutput], request_ids: list[str]) -> None:
        self._runner = runner
        self._gens = gens
        self._request_ids = request_ids
        self._finished_ids: set[str] = set()
        self._closed = False
        streams = [_chain(first, gen) for first, gen in zip(firsts, gens)]
        self._iter = runner._merge(streams, self._finished_ids, request_ids)

    def __aiter__(self) -> "MergedStream":
        return self

    async def __anext__(self) -> Indexed:
        return await self._iter.__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._iter.aclose()
        unfinished = [(g, rid) for g, rid in zip(self._gens, self._request_ids)
                      if rid not in self._finished_ids]
        if unfinished:
            logger.info("aborting unfinished requests %s", [rid for _, rid in unfinished])
            await self._runner._close_all([g for g, _ in unfinished], [rid for _, rid in unfinished])


async def _prime_all(gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """First delta of every generator, concurrently; the first failure cancels the rest."""
    async def first(gen: AsyncIterator[RequestOutput]) -> RequestOutput:
        return await anext(gen)

    tasks = [asyncio.ensure_future(first(g)) for g in gens]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _chain(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    async with aclosing(rest):  # type: ignore[type-var]
        yield first
        if first.finished:
            return
        async for out in rest:
            yield out


def accumulate(result: PromptResult, out: RequestOutput) -> None:
    if out.prompt_token_ids and not result.prompt_token_ids:
        result.prompt_token_ids = list(out.prompt_token_ids)
    for delta in out.outputs:
        choice = result.choices[delta.index]
        choice.token_ids.extend(delta.token_ids)
        choice.text_parts.append(delta.text)
        if delta.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + list(delta.logprobs)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
    if out.stats is not None:
        result.stats = out.stats
