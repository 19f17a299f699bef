"""The exposition passes `promtool check metrics`, and a real Prometheus scrapes and queries it."""
from __future__ import annotations

import pytest
from prometheus_client import start_http_server

from .promtools import promtool, running_prometheus


def test_promtool_accepts_rendered_metrics(populated_metrics):
    body, _ = populated_metrics.render()
    result = promtool("check", "metrics", stdin=body)
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout.decode()}{result.stderr.decode()}"


def test_promtool_rejects_a_broken_exposition():
    # The check above must be able to fail: a counter without _total and with a bad line.
    broken = b"# TYPE sparseserve_things counter\nsparseserve_things{model_name=\"x\" 1\n"
    assert promtool("check", "metrics", stdin=broken).returncode != 0


@pytest.fixture
def metrics_http_server(populated_metrics):
    server, thread = start_http_server(0, addr="127.0.0.1", registry=populated_metrics.registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_real_prometheus_scrapes_activated_params(populated_metrics, metrics_http_server):
    with running_prometheus([metrics_http_server], scrape_interval="1s") as prometheus:
        query = f'sparseserve_activated_params_total{{model_name="{populated_metrics.model_name}"}}'
        result = prometheus.wait_for(query, timeout_s=30)
        expected = sum((800_000.0 + i) * 5 for i in range(3))
        assert float(result[0]["value"][1]) == pytest.approx(expected)
        assert result[0]["metric"]["job"] == "sparse-serve"
        # A histogram query through PromQL works too (the heatmap's input).
        mean = prometheus.wait_for(
            "sparseserve_request_activated_params_per_token_sum / sparseserve_request_activated_params_per_token_count")
        assert float(mean[0]["value"][1]) == pytest.approx(expected / 15)
        # Values move: feed another request and see the scraped counter grow.
        populated_metrics.observe_http("/v1/completions", 200)
        grown = prometheus.wait_for(
            'sparseserve_http_requests_total{route="/v1/completions",status="200"}',
            predicate=lambda r: bool(r) and float(r[0]["value"][1]) == 4.0)
        assert grown
        assert [t["health"] for t in prometheus.targets()] == ["up"]
