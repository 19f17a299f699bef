"""Shared fixtures: a ServerMetrics that has seen every kind of input, so every series exists."""
from __future__ import annotations

import pytest

from sparse_serve.engine.core.outputs import EngineStats, RequestStats, StepStats
from sparse_serve.server.metrics import ServerMetrics

MODEL_NAME = "tiny-sparse"
NUM_LAYERS = 3


def feed_everything(metrics: ServerMetrics, num_requests: int = 3) -> None:
    """Requests, steps (with a predictor shadow check), engine snapshots and HTTP responses."""
    for i in range(num_requests):
        arrival = 1000.0 + i
        metrics.observe_request_finished(
            RequestStats(arrival_time=arrival, scheduled_time=arrival + 0.01, first_token_time=arrival + 0.2,
                         finished_time=arrival + 0.6, num_prompt_tokens=12, num_cached_tokens=4,
                         num_generated_tokens=5, total_params=2_000_000, mean_activated_params=800_000.0 + i,
                         mean_ffn_sparsity=0.8, mean_computed_fraction=0.35, mean_computed_params=1_100_000.0,
                         read_params=2_000_000.0, read_bytes=4_000_000.0,
                         token_times=[arrival + 0.2 + 0.1 * k for k in range(5)], finish_reasons=["stop"]))
        metrics.observe_http("/v1/completions", 200)
    metrics.observe_http("/v1/completions", 400)
    for k, (prefill, decode) in enumerate([(12, 0), (0, 3), (5, 2)]):
        metrics.observe_step(StepStats(
            duration_s=0.02 * (k + 1), num_seqs=3, num_prefill_tokens=prefill, num_decode_tokens=decode,
            num_generated_tokens=3, per_layer_active_fraction=[0.1, 0.2, 0.3],
            per_layer_computed_fraction=[0.3, 0.4, 0.5], read_params=1_200_000, read_bytes=2_400_000,
            dense_bytes=4_000_000,
            predictor_recall=[0.95, 0.9, 0.85] if k == 1 else None,
            predictor_precision=[0.7, 0.75, 0.8] if k == 1 else None))
    metrics.update_engine_stats(EngineStats(num_running=2, num_waiting=1, num_total_blocks=64, num_free_blocks=48,
                                            kv_cache_usage=0.25, num_preemptions=1, prefix_cache_queries=36,
                                            prefix_cache_hits=12))


@pytest.fixture
def populated_metrics() -> ServerMetrics:
    metrics = ServerMetrics(MODEL_NAME, NUM_LAYERS)
    feed_everything(metrics)
    return metrics
