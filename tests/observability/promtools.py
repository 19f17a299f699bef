"""Real Prometheus binaries for tests: `promtool` and `prometheus` from Debian's package.

`apt-get download prometheus` fetches the .deb without installing a service, `dpkg-deb -x`
unpacks it under `.cache/prometheus` in the repository root (gitignored), so it happens once
per checkout. The only reason to skip is a host without apt/dpkg; anything else that goes
wrong is an error, because a silently skipped observability test proves nothing.

Reuse from other test packages:
    from tests.observability.promtools import promtool_path, prometheus_path, running_prometheus
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "prometheus"
DOWNLOAD_TIMEOUT_S = 300


def _skip_loudly(reason: str) -> None:
    message = f"PROMETHEUS TOOLS UNAVAILABLE, observability checks SKIPPED: {reason}"
    logger.warning(message)
    warnings.warn(message, stacklevel=3)
    pytest.skip(message)


def _ensure_unpacked() -> Path:
    """The folder holding usr/bin/{promtool,prometheus}, downloading the package on first use."""
    binaries = [CACHE_DIR / "usr" / "bin" / name for name in ("promtool", "prometheus")]
    if all(path.is_file() for path in binaries):
        return CACHE_DIR
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        _skip_loudly("apt-get/dpkg-deb not found on this host")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # NOTE: a file lock, so that parallel pytest workers download the package once.
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(path.is_file() for path in binaries):
            return CACHE_DIR
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
            logger.info("downloading the Debian prometheus package into %s", CACHE_DIR)
            result = _apt_download(tmp)
            if result.returncode != 0 and os.geteuid() == 0:
                # NOTE: a fresh machine may have no package lists yet; as root we can fetch them.
                logger.info("apt-get download failed; running apt-get update once and retrying")
                subprocess.run(["apt-get", "update"], capture_output=True, timeout=DOWNLOAD_TIMEOUT_S)
                result = _apt_download(tmp)
            debs = sorted(Path(tmp).glob("prometheus_*.deb"))
            if result.returncode != 0 or not debs:
                raise RuntimeError(f"apt-get download prometheus failed (rc={result.returncode}):\n"
                                   f"{result.stdout}\n{result.stderr}\n(run `apt-get update` first?)")
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(CACHE_DIR)], check=True, timeout=DOWNLOAD_TIMEOUT_S)
    missing = [str(path) for path in binaries if not path.is_file()]
    if missing:
        raise RuntimeError(f"the prometheus package did not contain {missing}")
    return CACHE_DIR


def _apt_download(folder: str) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "download", "prometheus"], cwd=folder, capture_output=True, text=True,
                          timeout=DOWNLOAD_TIMEOUT_S)


def promtool_path() -> Path:
    return _ensure_unpacked() / "usr" / "bin" / "promtool"


def prometheus_path() -> Path:
    return _ensure_unpacked() / "usr" / "bin" / "prometheus"


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run promtool; returns the completed process (stdout/stderr as text) without checking rc."""
    return subprocess.run([str(promtool_path()), *args], input=stdin, capture_output=True, timeout=60)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PrometheusServer:
    url: str                    # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path

    def query(self, promql: str) -> list[dict]:
        """Instant query through the HTTP API; returns `data.result`."""
        params = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body}")
        return body["data"]["result"]

    def wait_for(self, promql: str, timeout_s: float = 30.0, predicate=bool) -> list[dict]:
        """Poll `promql` until `predicate(result)` holds (default: non-empty); the last result."""
        deadline = time.monotonic() + timeout_s
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{promql!r} did not satisfy the condition in {timeout_s}s; last result {result}; "
                           f"log:\n{self.log_path.read_text()[-3000:]}")

    def targets(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as response:
            return json.load(response)["data"]["activeTargets"]


def scrape_config(targets: list[str], scrape_interval: str = "1s", job: str = "sparse-serve") -> dict:
    return {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [{"job_name": job, "metrics_path": "/metrics",
                                "static_configs": [{"targets": list(targets)}]}]}


@contextlib.contextmanager
def running_prometheus(targets: list[str], scrape_interval: str = "1s",
                       ready_timeout_s: float = 30.0) -> Iterator[PrometheusServer]:
    """A real Prometheus on 127.0.0.1 at a free port scraping `targets` ("host:port"), with its
    storage in a temporary folder; ready when yielded, stopped (and the folder removed) after."""
    binary = prometheus_path()
    with tempfile.TemporaryDirectory(prefix="prometheus-") as tmp:
        work = Path(tmp)
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(targets, scrape_interval)))
        port = free_port()
        log_path = work / "prometheus.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(binary), f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}",
                 f"--web.console.templates={work}", f"--web.console.libraries={work}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=work)
        server = PrometheusServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
        try:
            _wait_ready(server, ready_timeout_s)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _wait_ready(server: PrometheusServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {server.process.returncode}:\n{server.log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"prometheus not ready after {timeout_s}s:\n{server.log_path.read_text()[-3000:]}")
