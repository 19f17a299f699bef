"""Shutdown: a real `python -P -m sparse_serve.server serve` process sent a real SIGTERM while
it streams. The streams finish in full within the grace period, new work is refused (503 or a
closed listener), and the process exits 0. A drain cut off by the grace period is not clean."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.live_server import LiveServer, small_config, tiny_engine, wait_until
from tests.reliability import TEST_TIMEOUT_S
from tests.reliability.support import sse_events

GRACE_S = 20.0
NUM_STREAMS = 3
MAX_TOKENS = 200          # with the tiny model, about a second: long enough to be mid-stream
LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
NEW_WORK = {"prompt": "too late", "max_tokens": 4}

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)


def start_server(tmp_path: Path, model_dir: Path) -> tuple[subprocess.Popen, str, Path]:
    config = tmp_path / "serve.yaml"
    config.write_text(f"server:\n  shutdown_timeout_s: {GRACE_S}\ncache:\n  block_size: 4\n"
                      "scheduler:\n  max_num_seqs: 4\n")
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "sparse_serve.server", "serve", "--model", str(model_dir),
             "--config", str(config), "--device", "cpu", "--kv-cache-bytes", "8MiB",
             "--host", "127.0.0.1", "--port", "0", "--log-level", "info"],
            stdout=out, stderr=subprocess.STDOUT)
    port = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        port = port or next(iter(LISTENING.findall(log.read_text())), None)
        try:
            if port and httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}", log
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=10)
    pytest.fail(f"the server did not become healthy:\n{log.read_text()[-3000:]}")


class Stream(threading.Thread):
    """One streaming completion, read to its end."""

    def __init__(self, url: str, index: int) -> None:
        super().__init__(daemon=True)
        self.url, self.index = url, index
        self.first_line, self.done = threading.Event(), threading.Event()
        self.text, self.error = "", None

    def run(self) -> None:
        body = {"prompt": f"stream {self.index}", "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as resp:
                for chunk in resp.iter_text():
                    self.text += chunk
                    self.first_line.set()
            self.done.set()
        except Exception as exc:      # reported by the test
            self.error = exc
            self.first_line.set()


def open_request_without_body(url: str) -> socket.socket:
    """A request whose headers the server has, its body still to come: admitted after SIGTERM."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    body_len = len(httpx.Request("POST", url, json=NEW_WORK).content)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {body_len}\r\n\r\n".encode())
    return sock


def finish_request(sock: socket.socket, url: str) -> bytes:
    sock.sendall(httpx.Request("POST", url, json=NEW_WORK).content)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    return answer


def refused(url: str) -> bool:
    """True once new connections are refused; a request that still gets through must be a 503."""
    try:
        resp = httpx.post(f"{url}/v1/completions", json=NEW_WORK, timeout=5)
    except httpx.ConnectError:
        return True
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down", resp.text
    return False


def test_sigterm_drains_streams_refuses_new_work_and_exits_0(tmp_path, tiny_model_dir):
    proc, url, log = start_server(tmp_path, tiny_model_dir)
    try:
        streams = [Stream(url, i) for i in range(NUM_STREAMS)]
        for stream in streams:
            stream.start()
        assert all(s.first_line.wait(timeout=30) for s in streams)
        late = open_request_without_body(url)
        assert not any(s.done.is_set() for s in streams), "the streams ended before the signal"

        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: refused(url), timeout=10, interval=0.02)
        late_answer = finish_request(late, url)
        assert late_answer.startswith(b"HTTP/1.1 503"), late_answer[:300]
        assert b'"shutting_down"' in late_answer

        for stream in streams:
            stream.join(timeout=GRACE_S)
            assert stream.error is None, repr(stream.error)
            events = sse_events(stream.text)
            finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
            assert finishes == ["length"], finishes
            assert events[-1]["usage"]["completion_tokens"] == MAX_TOKENS
        exit_code = proc.wait(timeout=GRACE_S + 10)
        assert time.monotonic() - signalled < GRACE_S
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert exit_code == 0, f"exit code {exit_code}:\n{log.read_text()[-3000:]}"


def test_drain_cut_off_by_the_grace_period_is_not_clean(tiny_model_dir):
    # max_num_seqs 1 and 50 ms a step: four queued 200-token streams take over 40 s, far past a
    # 0.3 s grace period on any machine (unslowed, a quiet machine could finish them in time)
    config = small_config(**{"scheduler.max_num_seqs": 1, "server.shutdown_timeout_s": 0.3})
    engine = tiny_engine(config, tiny_model_dir)
    step = engine.core.step

    def slow_step():
        time.sleep(0.05)
        return step()

    engine.core.step = slow_step
    server = LiveServer(engine, config).start()
    streams = [Stream(server.url, i) for i in range(4)]
    try:
        for stream in streams:
            stream.start()
        assert wait_until(lambda: any(s.first_line.is_set() for s in streams), timeout=30)
        server.server.handle_exit(signal.SIGTERM, None)
        server.thread.join(timeout=15)
        assert not server.thread.is_alive()
    finally:
        server.stop()
    assert server.server.drained is False          # so the CLI keeps the signal's exit status
    for stream in streams:
        stream.join(timeout=15)
    assert not all(s.text.endswith("data: [DONE]\n\n") for s in streams), "nothing was cut off"
