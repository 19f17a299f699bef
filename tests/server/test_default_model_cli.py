"""`sparse-serve serve` with no --model on a fresh cache serves the embedded SmolLM2, sparse."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def default_server(tmp_path):
    pytest.importorskip("gguf")
    port = free_port()
    env = {**os.environ, "SPARSE_SERVE_CACHE": str(tmp_path / "cache")}   # a fresh cache: converts
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the default model did not load within 300 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_no_model_serves_embedded_sparse_model(default_server):
    models = httpx.get(f"{default_server}/v1/models").json()
    name = models["data"][0]["id"]
    body = {"model": name, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24, "temperature": 0}
    reply = httpx.post(f"{default_server}/v1/chat/completions", json=body, timeout=120).json()
    answer = reply["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
    usage = reply["usage"]
    # the calibrated sidecar ships ~30% measured sparsity (configs/smollm2.yaml)
    assert 0.2 < usage["ffn_sparsity"] < 0.5, usage
    assert usage["activated_params"] < usage["total_params"]
