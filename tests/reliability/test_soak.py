"""Soak: many short requests of every kind in a row (150; 1,000 with
SPARSE_SERVE_RELIABILITY_LONG=1). After a warm-up, the process's resident memory grows by
under 5% and the engine holds nothing once they are done."""
from __future__ import annotations

import asyncio
import gc

import httpx
import psutil
import pytest

from tests.live_server import wait_until
from tests.reliability import TEST_TIMEOUT_S, scaled
from tests.reliability.support import engine_idle, sse_events

NUM_WARMUP = scaled(40, 100)
NUM_REQUESTS = scaled(150, 1000)
CONCURRENCY = 4
MAX_RSS_GROWTH = 0.05

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)


async def one_request(http: httpx.AsyncClient, i: int) -> None:
    """Request i: a completion, a chat, a streamed chat or a tokenize, each checked."""
    kind = i % 4
    text = f"soak request {i % 97}"     # a bounded set of prompts, so the prefix cache settles
    if kind == 0:
        resp = await http.post("/v1/completions", json={"prompt": text, "max_tokens": 4, "ignore_eos": True})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 4
    elif kind == 1:
        resp = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": text}], "max_tokens": 4, "ignore_eos": True})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["finish_reason"] == "length"
    elif kind == 2:
        resp = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": text}], "max_tokens": 4, "ignore_eos": True,
            "stream": True})
        assert resp.status_code == 200, resp.text
        assert sse_events(resp.text)[-1]["choices"][0]["finish_reason"] == "length"
    else:
        resp = await http.post("/tokenize", json={"prompt": text})
        assert resp.status_code == 200 and resp.json()["count"] > 0, resp.text


async def run_requests(url: str, start: int, count: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async def worker(offset: int) -> None:
            for i in range(start + offset, start + count, CONCURRENCY):
                await one_request(http, i)

        await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))


def settled_rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_soak_keeps_memory_flat(live_server):
    # NOTE: the server runs in this process (a thread), so this process's RSS is the server's
    asyncio.run(run_requests(live_server.url, 0, NUM_WARMUP))
    assert wait_until(lambda: engine_idle(live_server.engine))
    before = settled_rss()

    asyncio.run(run_requests(live_server.url, NUM_WARMUP, NUM_REQUESTS))
    assert wait_until(lambda: engine_idle(live_server.engine))
    after = settled_rss()

    growth = (after - before) / before
    assert growth < MAX_RSS_GROWTH, f"RSS grew {growth:.1%}: {before >> 20} MiB -> {after >> 20} MiB"
