"""Auth: with API keys set, every route the app has (read from its router, so a new route is
covered without editing this file) refuses a missing or a wrong key with an OpenAI-shaped 401;
only /health and /metrics answer without one."""
from __future__ import annotations

import re

import fastapi.routing
import httpx
import pytest

from tests.reliability import TEST_TIMEOUT_S
from tests.reliability.support import assert_openai_error

API_KEY = "sk-reliability-right"
OPEN_PATHS = {"/health", "/metrics"}
BAD_HEADERS = {
    "missing": {},
    "wrong key": {"Authorization": "Bearer sk-reliability-wrong"},
    "key prefix": {"Authorization": f"Bearer {API_KEY[:-1]}"},
    "wrong scheme": {"Authorization": f"Basic {API_KEY}"},
}

pytestmark = [
    pytest.mark.timeout(TEST_TIMEOUT_S),
    pytest.mark.parametrize("engine_config", [{"server.api_keys": [API_KEY]}], indirect=True),
]


def app_endpoints(app) -> list[tuple[str, str]]:
    """(method, concrete path) for every route and method the app serves, HEAD aside."""
    # NOTE: FastAPI >= 0.165 keeps included routers whole in app.routes; this flattens them
    flatten = getattr(fastapi.routing, "iter_route_contexts", list)
    endpoints = []
    for route in flatten(app.routes):
        methods = getattr(route, "methods", None) or {"GET"}
        path = re.sub(r"\{[^}]+\}", "x", route.path)      # /v1/models/{model:path} -> /v1/models/x
        endpoints += [(method, path) for method in sorted(methods - {"HEAD"})]
    return endpoints


def test_every_route_but_health_and_metrics_needs_the_key(live_server):
    endpoints = app_endpoints(live_server.app)
    paths = {path for _, path in endpoints}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize"} <= paths
    assert OPEN_PATHS <= paths
    endpoints.append(("GET", "/no/such/route"))     # unknown paths are refused before routing

    with httpx.Client(base_url=live_server.url, timeout=10) as http:
        for method, path in endpoints:
            if path in OPEN_PATHS:
                continue
            for why, headers in BAD_HEADERS.items():
                resp = http.request(method, path, headers=headers, json={})
                assert resp.status_code == 401, (method, path, why, resp.status_code, resp.text[:300])
                assert resp.headers.get("www-authenticate") == "Bearer", (method, path, why)
                assert_openai_error(resp.json(), code="invalid_api_key")
            resp = http.request(method, path, headers={"Authorization": f"Bearer {API_KEY}"}, json={})
            assert resp.status_code != 401, (method, path, "right key", resp.text[:300])


def test_health_and_metrics_answer_without_a_key(live_server):
    with httpx.Client(base_url=live_server.url, timeout=10) as http:
        for path in sorted(OPEN_PATHS):
            resp = http.get(path)
            assert resp.status_code == 200, (path, resp.text[:300])
        assert http.get("/health").json()["status"] == "ok"
        assert "sparseserve_" in http.get("/metrics").text
