"""A step that raises fails the requests in it (500, blocks freed) and the engine goes on; only
failures in a row stop it, and then /health, new requests and /metrics all say so at once."""
from __future__ import annotations

import httpx

from sparse_serve.engine.core.async_engine import MAX_STEP_FAILURES
from tests.live_server import wait_until

POISON = 77   # a prompt holding this token id makes the patched model runner raise


def _poison_runner(engine, always: bool = False) -> None:
    runner = engine.core.runner
    execute = runner.execute

    def failing_execute(sched):
        if always or any(POISON in item.seq.prompt_token_ids for item in sched.scheduled):
            raise RuntimeError("injected step failure")
        return execute(sched)

    runner.execute = failing_execute


def _metric(http: httpx.Client, name: str, **labels: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f"sparseserve_{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not exported")


def test_a_failed_step_fails_its_requests_only(http, live_server):
    engine = live_server.engine
    total = engine.get_stats().num_total_blocks
    _poison_runner(engine)
    for _ in range(MAX_STEP_FAILURES + 1):       # more than the in-a-row limit, each one alone
        resp = http.post("/v1/completions", json={"prompt": [5, POISON, 6], "max_tokens": 4},
                         headers={"x-request-id": "poisoned"})
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "internal_error"
        assert "injected" not in resp.text
        ok = http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 4})
        assert ok.status_code == 200, ok.text
    assert http.get("/health").json()["status"] == "ok"
    assert wait_until(lambda: engine.get_stats().num_free_blocks == total and engine.get_stats().num_running == 0)
    assert _metric(http, "engine_step_failures_total") == MAX_STEP_FAILURES + 1
    assert _metric(http, "engine_dead") == 0
    assert _metric(http, "request_success_total", finished_reason="error") == MAX_STEP_FAILURES + 1


def test_failures_in_a_row_stop_the_engine_and_health_says_so(http, live_server):
    engine = live_server.engine
    _poison_runner(engine, always=True)
    for _ in range(MAX_STEP_FAILURES):
        assert http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}).status_code == 500
    assert wait_until(lambda: engine.dead_reason is not None)
    health = http.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "dead"
    refused = http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
    assert _metric(http, "engine_dead") == 1
    assert _metric(http, "num_requests_running") == 0


def test_the_cli_server_exits_1_when_the_engine_stops(engine, engine_config):
    """`sparse-serve serve` exits (code 1) once the engine is dead, so the container's restart
    policy brings a fresh replica (docs/DEPLOY.md)."""
    import threading

    from sparse_serve.server.cli import create_server
    from sparse_serve.server.http_server import bind_socket

    _poison_runner(engine, always=True)
    server = create_server(engine_config, engine_factory=lambda _config: engine)
    sock = bind_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        assert wait_until(lambda: _health(url) == 200, timeout=30)
        for _ in range(MAX_STEP_FAILURES):
            httpx.post(url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}, timeout=30)
        thread.join(timeout=30)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    assert not thread.is_alive() and server.exit_code == 1


def _health(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=5).status_code
    except httpx.TransportError:
        return 0
