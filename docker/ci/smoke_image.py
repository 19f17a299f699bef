"""Runs the built CPU image as the Kubernetes manifests do and checks it (`make test-docker`).

    python3 -P docker/ci/smoke_image.py --image localhost/sparse-serve:cpu-test

The container gets what docker/k8s/ gives the pod: a read-only root filesystem with writable
/tmp and ~/.cache (the embedded model is converted there and the native kernel built there on
first start). Checks, in order: /health turns 200; a chat completion on the embedded model
answers; the server runs as uid 10001, not root; and `podman stop` (SIGTERM, then the grace
period) lets a stream that is in flight finish every token before the process exits with 0.
Standard library only: it runs on the host's Python, outside the project's venv.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

STREAM_TOKENS = 96          # a few seconds of decoding on a 2-core host: the stop lands mid-stream
STOP_TIMEOUT_S = 60         # podman stop's grace period; the server drains for up to 30 s
LOAD_TIMEOUT_S = 300        # the image's HEALTHCHECK start period


def podman(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout.strip()


def container_logs(cid: str) -> str:
    # NOTE: the server logs to stderr; podman logs hands back both streams as they were
    result = subprocess.run(["podman", "logs", cid], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def wait_healthy(port: int, cid: str) -> float:
    started = time.monotonic()
    last = "no answer"
    while time.monotonic() - started < LOAD_TIMEOUT_S:
        status = podman("inspect", "--format", "{{.State.Status}}", cid)
        if status in ("exited", "stopped", "dead"):
            raise AssertionError(f"container {status} while loading:\n{container_logs(cid)[-3000:]}")
        try:
            conn, resp = request(port, "GET", "/health", timeout=5)
            last = f"{resp.status} {resp.read()[:200]!r}"
            conn.close()
            if resp.status == 200:
                return time.monotonic() - started
            assert resp.status == 503, last      # loading: 503, never anything else
        except (ConnectionError, OSError) as exc:   # the port forward is up before the server
            last = repr(exc)
        time.sleep(1)
    raise AssertionError(f"/health not 200 after {LOAD_TIMEOUT_S} s (last: {last})")


def check_chat(port: int) -> str:
    conn, resp = request(port, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0})
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, body
    text = body["choices"][0]["message"]["content"]
    assert text.strip() and body["usage"]["completion_tokens"] > 0, body
    return text


def check_uid(cid: str) -> str:
    uid = podman("exec", cid, "python", "-c", "import os; print(os.getuid(), os.getgid())")
    assert uid == "10001 10001", f"the server runs as uid/gid {uid}, not 10001"
    # NOTE: PID 1 is the server itself (ENTRYPOINT exec form): it gets podman stop's SIGTERM.
    pid1 = podman("exec", cid, "cat", "/proc/1/cmdline").replace("\0", " ")
    assert "sparse-serve serve" in pid1, pid1
    return uid


def stream_then_stop(port: int, cid: str) -> dict:
    """Start a stream, stop the container once its first token arrived, read the stream out."""
    conn, resp = request(port, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": STREAM_TOKENS, "temperature": 0, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True}}, timeout=STOP_TIMEOUT_S)
    assert resp.status == 200, resp.read()
    first = resp.readline()
    while not first.startswith(b"data: "):
        first = resp.readline()
    stop: dict = {}

    def run_stop() -> None:
        started = time.monotonic()
        stop["result"] = subprocess.run(["podman", "stop", "-t", str(STOP_TIMEOUT_S), cid],
                                        capture_output=True, text=True, timeout=STOP_TIMEOUT_S + 30)
        stop["seconds"] = time.monotonic() - started

    stopper = threading.Thread(target=run_stop)
    stopper.start()
    events = [first]
    for line in resp:
        if line.startswith(b"data: "):
            events.append(line)
    conn.close()
    stopper.join()
    assert stop["result"].returncode == 0, stop["result"].stderr
    assert events[-1].strip() == b"data: [DONE]", f"stream cut off: last event {events[-1][:200]!r}"
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] == STREAM_TOKENS, usage
    exit_code = int(podman("inspect", "--format", "{{.State.ExitCode}}", cid))
    assert exit_code == 0, f"exit code {exit_code} after the drain:\n{container_logs(cid)[-3000:]}"
    logs = container_logs(cid)
    assert "draining" in logs, logs[-3000:]
    return {"stop_s": round(stop["seconds"], 1), "tokens": usage["completion_tokens"], "exit_code": exit_code}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    args = parser.parse_args()
    port = free_port()
    # NOTE: --read-only-tmpfs gives /tmp (and /run, /var/tmp) as tmpfs, like the pod's /tmp
    # emptyDir; the cache is an anonymous volume, which starts with the image folder's owner
    # (uid 10001), as the pod's emptyDir does through fsGroup (podman ignores a tmpfs mode here).
    cid = podman("run", "-d", "-p", f"127.0.0.1:{port}:8000", "--read-only", "--read-only-tmpfs=true",
                 "-v", "/home/sparse/.cache", args.image)
    try:
        print(f"health 200 after {wait_healthy(port, cid):.1f} s (read-only root filesystem)", flush=True)
        print(f"chat completion: {check_chat(port)!r}", flush=True)
        print(f"uid/gid: {check_uid(cid)}", flush=True)
        print(f"podman stop mid-stream: {stream_then_stop(port, cid)}", flush=True)
    except Exception:
        print(container_logs(cid)[-4000:], file=sys.stderr)
        raise
    finally:
        subprocess.run(["podman", "rm", "-f", "-v", cid], capture_output=True, timeout=120)
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
