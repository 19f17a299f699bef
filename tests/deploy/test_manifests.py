"""docker/k8s renders (kubectl kustomize) into what the server needs and the autoscaler and the
gateway assume: probes on the real routes with budgets that fit the drain, the pods' labels
selected by every object that points at them, flags the real CLI accepts, metric names the
server exports, and the CPU thresholds derived from the benchmark's measured capacity."""
from __future__ import annotations

import math
import re

import pytest
import yaml

from sparse_serve.server.cli import API_KEYS_ENV, build_parser
from sparse_serve.server.metrics import ServerMetrics

from .tools import K8S, KUSTOMIZATIONS, REPO, one, rendered

SERVER_KUSTOMIZATIONS = KUSTOMIZATIONS   # every one of them runs the server
QUEUE_BUDGET_S = 5.0                     # the queueing delay the CPU waiting threshold allows


def exported_gauges() -> set[str]:
    metrics = ServerMetrics("m", 2)
    return {family.name for family in metrics.registry.collect() if family.type == "gauge"}


def server_container(objects: list[dict]) -> dict:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "server")


def server_config(objects: list[dict]) -> dict:
    config_map = next(o for o in objects if o["kind"] == "ConfigMap"
                      and o["metadata"]["name"].startswith("sparse-serve-config"))
    return yaml.safe_load(config_map["data"]["deploy.yaml"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_with_one_namespace(kustomization):
    objects = rendered(kustomization)
    assert objects
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] not in cluster_scoped} == {"sparse-serve"}


@pytest.mark.parametrize("kustomization", SERVER_KUSTOMIZATIONS)
def test_the_cli_accepts_the_pod_arguments(kustomization):
    container = server_container(rendered(kustomization))
    assert container.get("command") is None          # the image's ENTRYPOINT: sparse-serve serve
    args = build_parser().parse_args(["serve", *container["args"]])
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert args.config == [f"{config_mount['mountPath']}/deploy.yaml"]
    if "gpu" in kustomization:
        assert args.model == "/models/model"
    else:
        assert args.model is None                      # the CPU image's embedded model


@pytest.mark.parametrize("kustomization", SERVER_KUSTOMIZATIONS)
def test_probes_and_drain_fit_together(kustomization):
    objects = rendered(kustomization)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    probes = {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert probe["httpGet"] == {"path": "/health", "port": "http"}   # open route (no API key)
    # Loading is covered by the startup probe: 10 min for a GPU model, 5 on the CPU image.
    startup = probes["startupProbe"]
    load_budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert load_budget >= (600 if "gpu" in kustomization else 300)
    # Readiness drops the replica at the first 503 (dead or draining).
    assert probes["readinessProbe"]["failureThreshold"] == 1
    # The drain: preStop pause, then SIGTERM and up to shutdown_timeout_s for running requests.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep" and pause >= 5
    drain = server_config(objects)["server"]["shutdown_timeout_s"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= pause + drain + 5, (grace, pause, drain)
    # Liveness can neither kill a pod mid-drain nor one busy generating (/health answers from
    # the event loop: tests/deploy/test_replicas_live.py), only one that stopped answering.
    liveness = probes["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace


@pytest.mark.parametrize("kustomization", SERVER_KUSTOMIZATIONS)
def test_pod_security_and_resources(kustomization):
    objects = rendered(kustomization)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    # What the server writes goes to emptyDirs (docker/ci/smoke_image.py runs the image so).
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp", "/home/sparse/.cache"}
    assert all("emptyDir" in volumes[m["name"]] for m in container["volumeMounts"] if not m.get("readOnly"))
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    if "gpu" in kustomization:
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
        claim = volumes["models"]["persistentVolumeClaim"]
        assert claim["readOnly"] and one(objects, "PersistentVolumeClaim", claim["claimName"])
        assert one(objects, "PersistentVolumeClaim", claim["claimName"])["spec"]["accessModes"] == ["ReadWriteMany"]
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
        assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    env = {e["name"]: e for e in container["env"]}
    assert env[API_KEYS_ENV]["valueFrom"]["secretKeyRef"] == {"name": "sparse-serve-api-keys", "key": "api-keys"}


@pytest.mark.parametrize("kustomization", SERVER_KUSTOMIZATIONS)
def test_everything_selects_the_server_pods(kustomization):
    objects = rendered(kustomization)
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}
    assert ports == {"http": 8000}

    def selects(selector: dict) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    service = one(objects, "Service")
    assert selects(service["spec"]["selector"]) and service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = one(objects, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"]) and pdb["spec"]["maxUnavailable"] == 1
    monitor = one(objects, "PodMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"])
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics", "interval": "5s"}]
    policy = one(objects, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"])
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    # Rolling updates never take a serving replica away before its replacement is ready.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"]     # the autoscaler's to set, not every apply's


def test_dashboard_configmap_is_the_compose_dashboard():
    objects = rendered("overlays/gpu")
    config_map = one(objects, "ConfigMap", "sparse-serve-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = REPO / "docker" / "grafana" / "dashboards" / "sparse-serve.json"
    assert config_map["data"]["sparse-serve.json"] == source.read_text()
    assert not list(K8S.rglob("*.json"))   # generated from that file, never copied


def autoscaler_inputs(kustomization: str) -> dict[str, float]:
    """{metric: per-replica threshold} of the kustomization's KEDA or HPA object."""
    objects = rendered(kustomization)
    scaled = [o for o in objects if o["kind"] == "ScaledObject"]
    if scaled:
        inputs = {}
        for trigger in scaled[0]["spec"]["triggers"]:
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            query = trigger["metadata"]["query"]
            metric = re.fullmatch(r'sum\((\w+)\{namespace="sparse-serve"\}\)', query).group(1)
            inputs[metric] = float(trigger["metadata"]["threshold"])
        return inputs
    hpa = one(objects, "HorizontalPodAutoscaler")
    return {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"]) for m in hpa["spec"]["metrics"]}


def behavior(kustomization: str) -> dict:
    objects = rendered(kustomization)
    scaled = [o for o in objects if o["kind"] == "ScaledObject"]
    if scaled:
        assert scaled[0]["spec"]["minReplicaCount"] >= 1          # no scale to zero: loads take minutes
        return scaled[0]["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    return one(objects, "HorizontalPodAutoscaler")["spec"]["behavior"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_autoscaler_reads_exported_gauges_and_scales_down_gently(kustomization):
    inputs = autoscaler_inputs(kustomization)
    assert set(inputs) == {"sparseserve_num_requests_waiting", "sparseserve_num_requests_running"}
    assert set(inputs) <= exported_gauges()
    down = behavior(kustomization)["scaleDown"]
    grace = one(rendered(kustomization), "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert down["stabilizationWindowSeconds"] >= 300
    # One replica at a time, each given longer than its whole drain before the next goes.
    assert [(p["type"], p["value"]) for p in down["policies"]] == [("Pods", 1)]
    assert down["policies"][0]["periodSeconds"] > grace


def test_keda_and_hpa_variants_agree():
    assert autoscaler_inputs("overlays/gpu") == autoscaler_inputs("examples/gpu-hpa")
    assert behavior("overlays/gpu") == behavior("examples/gpu-hpa")


def test_prometheus_adapter_rules_serve_the_hpa_metrics():
    values = yaml.safe_load((K8S / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    names = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"]).group(1)
    for metric in autoscaler_inputs("examples/gpu-hpa"):
        assert re.fullmatch(names, metric)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


def measured_cpu_capacity() -> tuple[float, int]:
    """(requests/s, clients) of our server's closed-loop 16-client row in the serving benchmark."""
    text = (REPO / "docs" / "benchmarks" / "serving.md").read_text()
    row = re.search(r"^\| ours \| closed (16) \| [^|]+\| [^|]+\| [^|]+\| ([\d.]+) \|", text, re.M)
    return float(row.group(2)), int(row.group(1))


def test_cpu_thresholds_come_from_the_measured_capacity():
    requests_per_s, clients = measured_cpu_capacity()
    inputs = autoscaler_inputs("overlays/cpu")
    # Little's law: W waiting at X requests/s wait about W / X seconds for a batch slot.
    assert inputs["sparseserve_num_requests_waiting"] == math.floor(requests_per_s * QUEUE_BUDGET_S)
    assert inputs["sparseserve_num_requests_running"] == clients
    assert clients == 16


def test_inference_pool_routes_to_the_server_pods_with_our_metric_names():
    objects = rendered("examples/gpu-inference-gateway")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pool = one(objects, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert all(pod_labels[k] == v for k, v in pool["spec"]["selector"]["matchLabels"].items())
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    picker_ref = pool["spec"]["endpointPickerRef"]
    picker_service = one(objects, "Service", picker_ref["name"])
    assert picker_ref["port"]["number"] in {p["port"] for p in picker_service["spec"]["ports"]}
    assert picker_ref["failureMode"] in ("FailOpen", "FailClose")
    picker = one(objects, "Deployment", picker_ref["name"])
    assert all(picker["spec"]["template"]["metadata"]["labels"].get(k) == v
               for k, v in picker_service["spec"]["selector"].items())
    assert not all(picker["spec"]["template"]["metadata"]["labels"].get(k) == v
                   for k, v in pool["spec"]["selector"]["matchLabels"].items())   # not a pool member
    args = dict(a.removeprefix("--").split("=", 1) for a in picker["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args["pool-name"] == pool["metadata"]["name"]
    assert args["total-queued-requests-metric"] == "sparseserve_num_requests_waiting"
    assert args["kv-cache-usage-percentage-metric"] == "sparseserve_kv_cache_usage_perc"
    assert args["lora-info-metric"] == ""
    assert {args["total-queued-requests-metric"], args["kv-cache-usage-percentage-metric"],
            "sparseserve_num_requests_running"} <= exported_gauges()
    route = one(objects, "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"])
    binding = one(objects, "ClusterRoleBinding", "sparse-serve-epp-auth")
    assert binding["subjects"][0]["namespace"] == pool["metadata"]["namespace"]
