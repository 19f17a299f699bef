"""The Grafana dashboard only queries metrics that ServerMetrics exports, through the
provisioned datasource, and covers what operators look for."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .exposition import sample_names
from .promql import metric_names, template_metric_names

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "sparse-serve.json"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))      # panels inside collapsed rows
    return [p for p in out if p.get("type") != "row"]


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expression) for every panel target and templating variable."""
    found = [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        found.append((f"variable {var['name']}", query["query"] if isinstance(query, dict) else query))
    return found


def test_promql_name_extraction():
    expr = ('histogram_quantile(0.9, sum by (le, phase) (rate(a_bucket{x=~"$v", y!="b_total"}[$__rate_interval])))'
            ' / on (job) group_left sum(rate(c_total[5m] offset 1h)) > bool 0 unless d')
    assert metric_names(expr) == {"a_bucket", "c_total", "d"}
    assert template_metric_names("label_values(m_running{a=\"b\"}, model_name)") == {"m_running"}


def test_every_dashboard_metric_is_exported(populated_metrics):
    body, _ = populated_metrics.render()
    exported = sample_names(body)
    all_queries = queries(load_dashboard())
    assert len(all_queries) > 20
    missing = {}
    for title, expr in all_queries:
        extract = template_metric_names if title.startswith("variable ") else metric_names
        names = extract(expr)
        assert names, f"{title}: no metric found in {expr!r}"
        for name in names - exported:
            missing.setdefault(title, []).append(name)
    assert not missing, f"dashboard queries name metrics that /metrics does not export: {missing}"


def test_dashboard_uses_the_provisioned_datasource_and_a_sane_layout():
    dashboard = load_dashboard()
    provisioned = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    occupied = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
    for var in dashboard["templating"]["list"]:
        assert var["datasource"]["uid"] == uid


@pytest.mark.parametrize("needle, metric", [
    ("Throughput", "sparseserve_generation_tokens_total"),
    ("Time to first token", "sparseserve_time_to_first_token_seconds_bucket"),
    ("Inter-token latency", "sparseserve_inter_token_latency_seconds_bucket"),
    ("End-to-end", "sparseserve_e2e_request_latency_seconds_bucket"),
    ("running / waiting", "sparseserve_num_requests_waiting"),
    ("KV cache", "sparseserve_kv_cache_usage_perc"),
    ("errors by status", "sparseserve_http_requests_total"),
    ("Activated params per token", "sparseserve_request_activated_params_per_token_bucket"),
    ("FFN sparsity per layer", "sparseserve_ffn_sparsity"),
    ("own vs computed", "sparseserve_computed_params_total"),
    ("Predictor recall", "sparseserve_predictor_recall"),
    ("bytes read per generated token vs dense", "sparseserve_read_bytes_total"),
    ("bytes read per generated token vs dense", "sparseserve_model_weight_bytes"),
])
def test_dashboard_covers_the_issue(needle, metric):
    matching = [p for p in panels(load_dashboard()) if needle.lower() in p["title"].lower()]
    assert matching, f"no panel titled like {needle!r}"
    assert any(metric in metric_names(t["expr"]) for p in matching for t in p["targets"]), (needle, metric)


def test_latency_panels_show_three_quantiles_and_params_panel_is_a_heatmap():
    by_title = {p["title"]: p for p in panels(load_dashboard())}
    for title in ("Time to first token", "Inter-token latency"):
        exprs = " ".join(t["expr"] for t in by_title[title]["targets"])
        assert all(f"histogram_quantile({q}," in exprs for q in ("0.5", "0.95", "0.99")), title
    heatmap = by_title["Activated params per token (distribution over requests)"]
    assert heatmap["type"] == "heatmap"
    assert heatmap["targets"][0]["format"] == "heatmap" and "sum by (le)" in heatmap["targets"][0]["expr"]
