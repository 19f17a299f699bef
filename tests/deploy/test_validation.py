"""Every rendered object against its schema, and checkov over all of them, with the tools of
requirements.deploy.lock (`make install-deploy`), run as subprocesses of that venv; each tool
runs once for every kustomization and the deliberately broken examples together."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .tools import KUSTOMIZATIONS, deploy_python, rendered_text

VALIDATOR = Path(__file__).with_name("validate_objects.py")
# Kinds whose CRD schemas no pinned package ships; test_manifests checks them field by field.
CHECKED_BY_HAND = {"InferencePool", "HTTPRoute"}

BROKEN_OBJECTS = """\
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: misspelt}
spec:
  scaleTargetRef: {name: sparse-serve}
  minReplicas: 1
  triggers: [{type: prometheus, metadata: {query: q, threshold: "6"}}]
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: number}
spec:
  scaleTargetRef: {name: sparse-serve}
  triggers: [{type: prometheus, metadata: {query: q, threshold: 6}}]
---
apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata: {name: misplaced}
spec:
  selector: {matchLabels: {a: b}}
  podMetricsEndpoints: [{port: http, path: /metrics, scrapeEvery: 5s}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: misspelt}
spec:
  replica: 2
  selector: {matchLabels: {a: b}}
  template: {metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: i}]}}
"""
BAD_POD = """\
apiVersion: v1
kind: Pod
metadata: {name: bad, namespace: x}
spec: {containers: [{name: c, image: "i:latest", securityContext: {privileged: true}}]}
"""


@pytest.fixture(scope="module")
def rendered_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("rendered")
    for kustomization in KUSTOMIZATIONS:
        (directory / f"{kustomization.replace('/', '-')}.yaml").write_text(rendered_text(kustomization))
    return directory


@pytest.fixture(scope="module")
def validation(rendered_dir, tmp_path_factory) -> list[dict]:
    broken = tmp_path_factory.mktemp("broken") / "broken.yaml"
    broken.write_text(BROKEN_OBJECTS)
    files = [*sorted(rendered_dir.glob("*.yaml")), broken]
    result = subprocess.run([str(deploy_python()), "-P", str(VALIDATOR), *map(str, files)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_matches_its_schema(kustomization, validation):
    results = [r for r in validation if Path(r["file"]).stem == kustomization.replace("/", "-")]
    assert results
    for result in results:
        assert result["errors"] == [], result
        if result["validator"] == "none":
            assert result["kind"] in CHECKED_BY_HAND, result
    validated = {r["kind"]: r["validator"] for r in results}
    assert validated["Deployment"] == "kubernetes-validate:1.32.0-strict"
    assert validated["PodMonitor"] == "cloudcoil:cloudcoil.models.prometheus_operator.v1"
    assert validated.get("ScaledObject", validated.get("HorizontalPodAutoscaler")) in (
        "cloudcoil:cloudcoil.models.keda.v1alpha1", "kubernetes-validate:1.32.0-strict")


def test_the_validators_reject_broken_objects(validation):
    errors = {(r["kind"], r["name"]): r["errors"] for r in validation if r["file"].endswith("broken.yaml")}
    assert any("minReplicas" in e for e in errors[("ScaledObject", "misspelt")])
    assert any("threshold" in e for e in errors[("ScaledObject", "number")])
    assert any("scrapeEvery" in e for e in errors[("PodMonitor", "misplaced")])
    assert any("replica" in e for e in errors[("Deployment", "misspelt")])


@pytest.fixture(scope="module")
def checkov_results(rendered_dir) -> dict[str, dict]:
    bad = rendered_dir / "bad" / "bad-pod.yaml"
    bad.parent.mkdir()
    bad.write_text(BAD_POD)
    checkov = deploy_python().parent / "checkov"
    # NOTE: --skip-download: no network is needed (or reached); the policies ship in the package.
    result = subprocess.run([str(checkov), "-d", str(rendered_dir), "--framework", "kubernetes", "--compact",
                             "--skip-download", "-o", "json"], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["parsing_errors"] == 0
    by_outcome: dict[str, dict] = {}
    for outcome in ("passed_checks", "failed_checks", "skipped_checks"):
        for check in report["results"].get(outcome, []):
            where = "bad" if check["file_path"].startswith("/bad/") else "ours"
            by_outcome.setdefault(where, {}).setdefault(outcome, []).append(check)
    return by_outcome


def test_checkov_finds_nothing_unjustified(checkov_results):
    ours = checkov_results["ours"]
    failed = [(c["check_id"], c["file_path"], c["resource"], c["check_name"]) for c in ours.get("failed_checks", [])]
    assert failed == []
    assert len(ours["passed_checks"]) > 300
    # Each skip is an annotation on the object, its reason beside it (checkov.io/skipN: ID=reason).
    for skipped in ours.get("skipped_checks", []):
        assert len(skipped["check_result"].get("suppress_comment") or "") > 30, skipped["check_id"]


def test_checkov_catches_a_bad_pod(checkov_results):
    failed = {c["check_id"] for c in checkov_results["bad"]["failed_checks"]}
    assert "CKV_K8S_16" in failed          # privileged container
