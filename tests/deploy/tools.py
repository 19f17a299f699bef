"""What the deployment tests share: rendering docker/k8s with kubectl, and the deploy tools' venv.

A missing tool skips the tests that need it with the command that installs it, except under
CI=true, where it fails them: CI must run every check (.ci/run installs the venv first).
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "docker" / "k8s"
# Every kustomization a user applies: the two overlays and the two variants built on the gpu one.
KUSTOMIZATIONS = ("overlays/gpu", "overlays/cpu", "examples/gpu-hpa", "examples/gpu-inference-gateway")


def missing(what: str, how: str) -> None:
    message = f"{what} not found ({how})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI runs every deployment check")
    pytest.skip(message)


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        missing("kubectl", "kubectl >= 1.27 carries kustomize 5; Debian: apt-get install kubectl")
    return found


@functools.cache
def rendered_text(kustomization: str) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(K8S / kustomization)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(kustomization: str) -> list[dict]:
    return [o for o in yaml.safe_load_all(rendered_text(kustomization)) if o]


def one(objects: list[dict], kind: str, name: str = "sparse-serve") -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name}"
    return found[0]


def deploy_python() -> Path:
    venv = Path(os.environ.get("SPARSE_SERVE_DEPLOY_VENV", REPO / ".cache" / "venv-deploy"))
    python = (venv if venv.is_absolute() else REPO / venv) / "bin" / "python"
    if not python.exists():
        missing(f"the deploy tools' venv {venv}", "make install-deploy")
    return python
