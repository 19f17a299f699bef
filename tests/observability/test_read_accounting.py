"""Issue 23's metrics proof on the real server (tiny dReLU model with predictors, CPU): every
response's computed params are at least its activated params; on dense-fallback steps they are
the whole model plus the predictors; the read counters add up to what the responses were charged.

Expected numbers come from the responses and the checkpoint's own config.json (sizes), never
from the server's internals.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.live_server import LiveServer, small_config, tiny_engine
from tests.tiny_checkpoint import make_tiny_checkpoint

from .exposition import value

MODEL = "tiny-sparse"
RANK = 16
PROMPTS = ["Hello world", "The capital of France is", "Neurons cost nothing", "café 東京 and more words"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("reads") / MODEL, "drelu", predictor_rank=RANK,
                                num_layers=2, max_position_embeddings=256)


def predictor_params(folder) -> int:
    cfg = json.loads((folder / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return layers * (RANK * hidden + inter * RANK)


def serve_traffic(folder, **overrides) -> tuple[list[dict], bytes]:
    """Four concurrent completions (steps batch them; one prompt is longer, so some steps mix a
    prefill with decodes), then /metrics once the engine is idle."""
    config = small_config(**overrides)
    with LiveServer(tiny_engine(config, folder), config) as server, \
            httpx.Client(base_url=server.url, timeout=60.0) as http:
        def complete(prompt: str) -> dict:
            response = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 6,
                                                          "ignore_eos": True})
            assert response.status_code == 200, response.text
            return response.json()["usage"]

        with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
            usages = list(pool.map(complete, PROMPTS))
        for _ in range(200):
            body = http.get("/metrics").content
            if value(body, "sparseserve_num_requests_running", model_name=MODEL) == 0:
                break
    return usages, body


def assert_read_counters_add_up(usages: list[dict], body: bytes) -> None:
    """Each step's reads are shared among its requests by tokens: the responses' shares add up
    to the per-step counters (each share rounded to an integer in its response)."""
    metric = lambda name: value(body, f"sparseserve_{name}", model_name=MODEL)   # noqa: E731
    tolerance = 0.5 * len(usages) + 1e-6
    assert metric("read_params_total") == pytest.approx(sum(u["read_params"] for u in usages), abs=tolerance)
    assert metric("read_bytes_total") == pytest.approx(sum(u["read_bytes"] for u in usages), abs=tolerance)
    bytes_per_param = metric("model_weight_bytes") / usages[0]["total_params"]
    assert bytes_per_param in (2, 4)
    assert metric("read_bytes_total") == metric("read_params_total") * bytes_per_param
    tokens = sum(u["completion_tokens"] for u in usages)
    assert metric("computed_params_total") == pytest.approx(
        sum(u["computed_params"] * u["completion_tokens"] for u in usages), abs=0.5 * tokens + 1e-6)


def test_sparse_steps_compute_at_least_the_activated_params(model_dir):
    usages, body = serve_traffic(model_dir)
    for usage in usages:
        assert usage["activated_params"] < usage["total_params"]            # dReLU really is sparse
        assert usage["computed_params"] >= usage["activated_params"], usage
        # the sparse kernels read less than the model plus its predictors
        assert usage["computed_params"] < usage["total_params"] + predictor_params(model_dir), usage
        assert usage["read_params"] > 0 and usage["read_bytes"] > usage["read_params"]
    assert_read_counters_add_up(usages, body)


@pytest.mark.parametrize("overrides", [{"model.sparse_kernels": False}, {"model.dense_fallback_fraction": 0.0}],
                         ids=["sparse-kernels-off", "fallback-fraction-0"])
def test_dense_fallback_steps_compute_the_whole_model_and_predictors(model_dir, overrides):
    usages, body = serve_traffic(model_dir, **overrides)
    dense = usages[0]["total_params"] + predictor_params(model_dir)
    for usage in usages:
        assert usage["computed_params"] == dense, usage
        assert usage["computed_params"] >= usage["activated_params"]
    # every step read the whole model and the predictors once
    steps = value(body, "sparseserve_batch_size_count", model_name=MODEL)
    assert value(body, "sparseserve_read_params_total", model_name=MODEL) == steps * dense
    assert_read_counters_add_up(usages, body)
