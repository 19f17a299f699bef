"""Overload: four times more concurrent clients than the engine admits. Every request ends in
a full answer or a 429 with Retry-After (never a 5xx or a hang), and /health stays fast."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.live_server import wait_until
from tests.reliability import TEST_TIMEOUT_S, scaled
from tests.reliability.support import assert_openai_error, engine_idle, sse_events

MAX_NUM_SEQS = 2
MAX_QUEUED = 4
NUM_CLIENTS = 4 * (MAX_NUM_SEQS + MAX_QUEUED)   # 4x what runs plus what may wait
NUM_WAVES = scaled(5, 20)                       # requests per client, one after the other
MAX_TOKENS = 24
CLIENT_TIMEOUT_S = 30.0
HEALTH_BUDGET_S = 1.0

pytestmark = [
    pytest.mark.timeout(TEST_TIMEOUT_S),
    pytest.mark.parametrize("engine_config", [{"scheduler.max_num_seqs": MAX_NUM_SEQS,
                                               "scheduler.max_queued_requests": MAX_QUEUED}],
                            indirect=True),
]


def request_body(client: int, wave: int) -> tuple[str, dict]:
    """Alternate chat and completions, streaming and not, so every path meets the full queue."""
    body: dict = {"max_tokens": MAX_TOKENS, "ignore_eos": True}
    if (client + wave) % 2:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if client % 2:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": f"hi {client}"}]}
    return "/v1/completions", {**body, "prompt": f"hello {client} {wave}"}


def check_answer(path: str, body: dict, resp: httpx.Response) -> str:
    """'ok' for a full answer, '429' for a polite refusal; anything else fails the test."""
    if resp.status_code == 429:
        assert "retry-after" in resp.headers, resp.headers
        assert int(resp.headers["retry-after"]) > 0, resp.headers
        assert_openai_error(resp.json(), code="engine_overloaded")
        return "429"
    assert resp.status_code == 200, (path, resp.status_code, resp.text[:500])
    if body.get("stream"):
        events = sse_events(resp.text)
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        usage = events[-1]["usage"]
    else:
        reply = resp.json()
        finishes = [c["finish_reason"] for c in reply["choices"]]
        usage = reply["usage"]
    assert finishes == ["length"], (path, finishes)
    assert usage["completion_tokens"] == MAX_TOKENS, (path, usage)
    return "ok"


async def client_run(http: httpx.AsyncClient, client: int) -> list[str]:
    outcomes = []
    for wave in range(NUM_WAVES):
        path, body = request_body(client, wave)
        resp = await http.post(path, json=body, timeout=CLIENT_TIMEOUT_S)
        outcomes.append(check_answer(path, body, resp))
    return outcomes


async def poll_health(http: httpx.AsyncClient, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        started = time.monotonic()
        try:
            resp = await http.get("/health", timeout=HEALTH_BUDGET_S)
        except httpx.TimeoutException:
            raise AssertionError(f"/health took over {HEALTH_BUDGET_S} s under overload") from None
        latencies.append(time.monotonic() - started)
        assert resp.status_code == 200, resp.text
        await asyncio.sleep(0.05)
    return latencies


async def overload(url: str) -> tuple[list[str], list[float]]:
    limits = httpx.Limits(max_connections=NUM_CLIENTS + 2, max_keepalive_connections=NUM_CLIENTS + 2)
    async with httpx.AsyncClient(base_url=url, limits=limits) as http, \
            httpx.AsyncClient(base_url=url) as health_http:
        stop = asyncio.Event()
        health = asyncio.create_task(poll_health(health_http, stop))
        try:
            per_client = await asyncio.gather(*(client_run(http, c) for c in range(NUM_CLIENTS)))
        finally:
            stop.set()
        latencies = await health
    return [o for outcomes in per_client for o in outcomes], latencies


def test_overload_answers_or_sheds_load_and_health_stays_fast(live_server):
    outcomes, latencies = asyncio.run(overload(live_server.url))

    assert len(outcomes) == NUM_CLIENTS * NUM_WAVES
    assert outcomes.count("429") > 0, "the queue never filled: the test did not overload the server"
    assert outcomes.count("ok") >= MAX_QUEUED      # the first burst alone fills the queue
    assert len(latencies) >= 5 and max(latencies) < HEALTH_BUDGET_S, latencies
    assert wait_until(lambda: engine_idle(live_server.engine))
