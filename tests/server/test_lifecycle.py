"""Disconnects, graceful drain, loading in the background, and the small endpoints."""
from __future__ import annotations

import signal
import threading

import httpx
import pytest

from sparse_serve.server.cli import create_server
from sparse_serve.server.http_server import bind_socket
from tests.server.conftest import CHAT, MESSAGES, small_config, wait_until


def blocks_full(engine) -> bool:
    stats = engine.get_stats()
    return stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0 and stats.num_waiting == 0


@pytest.mark.parametrize("num_lines", [0, 6])
@pytest.mark.parametrize("n", [1, 2])
def test_streaming_disconnect_frees_blocks(live_server, num_lines, n):
    engine = live_server.engine
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        body = {"messages": MESSAGES, "max_tokens": 200, "stream": True, "n": n, "ignore_eos": True}
        with http.stream("POST", CHAT, json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(num_lines):
                next(lines)
            assert engine.get_stats().num_free_blocks < engine.get_stats().num_total_blocks
    assert wait_until(lambda: blocks_full(engine))
    assert wait_until(lambda: not engine.core.requests and engine.num_unfinished == 0)  # aborted


def test_non_streaming_disconnect_aborts(live_server):
    engine = live_server.engine
    with httpx.Client(base_url=live_server.url, timeout=httpx.Timeout(30, read=0.15)) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 200, "ignore_eos": True})
    assert wait_until(lambda: blocks_full(engine))
    assert wait_until(lambda: not engine.core.requests and engine.num_unfinished == 0)  # aborted


def test_completions_with_several_prompts_disconnect_aborts_all(live_server):
    engine = live_server.engine
    body = {"prompt": ["a", "b", "c"], "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(6):
                next(lines)
            assert engine.get_stats().num_running == 3
    assert wait_until(lambda: blocks_full(engine))
    assert wait_until(lambda: not engine.core.requests and engine.num_unfinished == 0)  # aborted


def test_graceful_drain_lets_running_requests_finish(live_server):
    engine = live_server.engine
    result: dict = {}

    def consume() -> None:
        with httpx.Client(base_url=live_server.url, timeout=30) as http:
            resp = http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 120, "stream": True,
                                         "ignore_eos": True})
            result["text"] = resp.text

    worker = threading.Thread(target=consume)
    worker.start()
    assert wait_until(lambda: engine.get_stats().num_running == 1)
    live_server.server.handle_exit(signal.SIGTERM, None)      # what uvicorn's signal handler calls
    assert live_server.state.draining
    try:
        refused = httpx.post(live_server.url + CHAT, json={"messages": MESSAGES}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    except httpx.ConnectError:
        pass  # the listener is already closed: refused just as well
    worker.join(timeout=20)
    assert result["text"].endswith("data: [DONE]\n\n")
    assert '"finish_reason":"length"' in result["text"]
    live_server.thread.join(timeout=20)
    assert not live_server.thread.is_alive()
    assert live_server.state.engine is None                  # lifespan shut the engine down


def _serve_in_thread(engine_factory):
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = small_config(**{"server.port": port})
    server = create_server(config, engine_factory)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started or not thread.is_alive())
    return server, thread, f"http://127.0.0.1:{port}", sock


def test_health_is_503_while_loading_then_200(engine):
    release = threading.Event()

    def slow_factory(config):
        release.wait(timeout=20)
        return engine

    server, thread, url, sock = _serve_in_thread(slow_factory)
    try:
        loading = httpx.get(url + "/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        busy = httpx.post(url + CHAT, json={"messages": MESSAGES})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "model_loading"
        release.set()
        assert wait_until(lambda: httpx.get(url + "/health").status_code == 200)
        resp = httpx.post(url + CHAT, json={"messages": MESSAGES, "max_tokens": 3})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    assert server.exit_code == 0


def test_load_failure_stops_the_server_with_exit_code_1():
    def broken_factory(config):
        raise FileNotFoundError("no config.json in /nowhere")

    server, thread, _, sock = _serve_in_thread(broken_factory)
    thread.join(timeout=15)
    sock.close()
    assert not thread.is_alive()
    assert server.exit_code == 1
    assert "config.json" in server.state.load_error


def test_tokenize_detokenize_version_health(live_server):
    with httpx.Client(base_url=live_server.url) as http:
        tok = http.post("/tokenize", json={"prompt": "hi"}).json()
        assert tok["count"] == len(tok["tokens"]) > 0
        assert tok["max_model_len"] == live_server.engine.max_model_len
        plain = http.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()
        assert tok["tokens"][-plain["count"]:] == plain["tokens"]
        chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
        assert chat["count"] > tok["count"]
        no_gen = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
        assert no_gen["count"] < chat["count"]
        assert http.post("/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": "hi"}
        assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
        assert http.post("/tokenize", json={"prompt": "a", "messages": MESSAGES}).status_code == 400
        assert http.get("/version").json()["version"]
        health = http.get("/health").json()
        assert health == {"status": "ok", "model": "tiny-sparse"}


def test_metrics_count_requests_and_routes(live_server):
    with httpx.Client(base_url=live_server.url) as http:
        assert http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 3}).status_code == 200
        assert http.post(CHAT, json={"model": "nope", "messages": MESSAGES}).status_code == 404
        http.get("/random/scanner/path")
        resp = http.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert 'route="/v1/chat/completions",status="200"' in text
    assert 'route="/v1/chat/completions",status="404"' in text
    assert 'route="other",status="404"' in text
    assert "/random/scanner/path" not in text
    assert "sparseserve_request_success_total" in text
