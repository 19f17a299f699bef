"""Validates rendered Kubernetes objects against their schemas; runs in the deploy tools' venv.

    .cache/venv-deploy/bin/python -P tests/deploy/validate_objects.py RENDERED.yaml...

Prints one JSON line per object: {"file", "kind", "apiVersion", "name", "validator", "errors"}.
- Built-in kinds: kubernetes-validate's strict JSON schemas for Kubernetes 1.32 (unknown fields are
  errors, as with `kubectl apply`'s default strict field validation).
- KEDA's ScaledObject and the Prometheus Operator's PodMonitor/ServiceMonitor: the cloudcoil
  model packages, generated from those projects' CRD schemas (pinned in requirements.deploy.lock).
  A model ignores unknown fields, so the object must also survive a round trip through it
  unchanged: a misspelt or misplaced field, or a value of the wrong type, shows as a difference.
- Anything else: validator "none" (the caller decides what that means).
Run by tests/deploy (its own interpreter, so these packages never meet the serving lock's),
once for all files: importing the CRD models takes seconds.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Iterator

import kubernetes_validate
import yaml
from pydantic import ValidationError

K8S_VERSION = "1.32.0"   # the kubectl (and kustomize 5.5) these machines carry


def crd_models() -> dict[tuple[str, str], type]:
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    return {("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
            ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
            ("monitoring.coreos.com/v1", "PodMonitor"): monitoring.PodMonitor,
            ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor}


def differences(given: Any, kept: Any, path: str = "") -> Iterator[str]:
    """Paths where `kept` (the model's dump) does not reproduce `given`."""
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            yield f"{path or '/'}: became {type(kept).__name__}"
            return
        for key, value in given.items():
            if key not in kept:
                yield f"{path}/{key}: unknown field (dropped by the schema)"
            else:
                yield from differences(value, kept[key], f"{path}/{key}")
    elif isinstance(given, list):
        if not isinstance(kept, list) or len(kept) != len(given):
            yield f"{path}: list not kept"
            return
        for i, (a, b) in enumerate(zip(given, kept)):
            yield from differences(a, b, f"{path}/{i}")
    elif given != kept:
        yield f"{path}: {given!r} became {kept!r}"


def validate_crd(model: type, obj: dict) -> list[str]:
    try:
        parsed = model.model_validate(obj)
    except ValidationError as exc:
        return [f"{'/'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return list(differences(obj, parsed.model_dump(mode="json", by_alias=True, exclude_none=True)))


def validate_builtin(obj: dict, version: str) -> list[str] | None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return None
    except kubernetes_validate.ValidationError as exc:
        return [f"{'/'.join(map(str, exc.path))}: {exc.message}"]
    return []


def main() -> int:
    models = crd_models()
    for path in sys.argv[1:]:
        with open(path) as f:
            objects = [o for o in yaml.safe_load_all(f) if o]
        for obj in objects:
            key = (obj.get("apiVersion"), obj.get("kind"))
            result = {"file": path, "kind": obj.get("kind"), "apiVersion": obj.get("apiVersion"),
                      "name": (obj.get("metadata") or {}).get("name")}
            if key in models:
                result.update(validator=f"cloudcoil:{models[key].__module__}",
                              errors=validate_crd(models[key], obj))
            else:
                errors = validate_builtin(obj, K8S_VERSION)
                result.update(validator="none" if errors is None else f"kubernetes-validate:{K8S_VERSION}-strict",
                              errors=errors or [])
            print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
