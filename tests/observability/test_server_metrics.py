"""ServerMetrics fed with hand-made engine stats: the rendered values are what was fed."""
from __future__ import annotations

import logging

import pytest

from sparse_serve.engine.core.outputs import EngineStats, RequestStats, StepStats
from sparse_serve.server.metrics import LAYER_EMA_ALPHA, PREDICTOR_EMA_ALPHA, ServerMetrics

from .exposition import bucket, sample_names, samples, value

MODEL = "tiny-sparse"


def make_request(arrival: float = 100.0, num_generated: int = 4, sparsity: float = 0.75,
                 computed: float = 0.5, total: int = 10_000, ffn: int = 8_000, **extra) -> RequestStats:
    """A request whose activated and computed params follow the engine's definitions for an FFN of
    `ffn` params (computed: the share `computed` of the FFN rows read), at 2 bytes a weight."""
    token_times = [arrival + 0.3 + 0.1 * i for i in range(num_generated)]
    computed_params = total - ffn + computed * ffn
    fields = dict(arrival_time=arrival, scheduled_time=arrival + 0.05, first_token_time=token_times[0] if token_times else None,
                  finished_time=arrival + 1.0, num_prompt_tokens=7, num_generated_tokens=num_generated,
                  total_params=total, mean_activated_params=total - sparsity * ffn, mean_ffn_sparsity=sparsity,
                  mean_computed_fraction=computed, mean_computed_params=computed_params,
                  read_params=computed_params * num_generated / 2, read_bytes=computed_params * num_generated,
                  token_times=token_times)
    fields.update(extra)
    return RequestStats(**fields)


def render(metrics: ServerMetrics) -> bytes:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return body


def test_finished_requests_counts_and_sums():
    metrics = ServerMetrics(MODEL, num_layers=2)
    fed = [make_request(arrival=10.0 * i, num_generated=3 + i, sparsity=0.6 + 0.1 * i, computed=0.5 + 0.1 * i,
                        finish_reasons=["stop"] if i < 2 else ["length", "stop"])
           for i in range(3)]
    for stats in fed:
        metrics.observe_request_finished(stats)
    text = render(metrics)
    m = {"model_name": MODEL}
    assert value(text, "sparseserve_request_success_total", finished_reason="stop", **m) == 3
    assert value(text, "sparseserve_request_success_total", finished_reason="length", **m) == 1
    assert value(text, "sparseserve_request_success_total", finished_reason="abort", **m) == 0
    assert value(text, "sparseserve_prompt_tokens_total", **m) == 21
    assert value(text, "sparseserve_request_generation_tokens_sum", **m) == sum(s.num_generated_tokens for s in fed)
    for name, attr in (("time_to_first_token_seconds", "ttft"), ("e2e_request_latency_seconds", "e2e_latency"),
                       ("request_queue_time_seconds", "queue_time")):
        assert value(text, f"sparseserve_{name}_count", **m) == 3
        assert value(text, f"sparseserve_{name}_sum", **m) == pytest.approx(sum(getattr(s, attr) for s in fed))
    # Inter-token latency: (n - 1) gaps of 0.1 s per request.
    assert value(text, "sparseserve_inter_token_latency_seconds_count", **m) == sum(s.num_generated_tokens - 1 for s in fed)
    assert value(text, "sparseserve_inter_token_latency_seconds_sum", **m) == pytest.approx(
        0.1 * sum(s.num_generated_tokens - 1 for s in fed))
    # Sparsity histograms hold the per-request means; counters hold mean * tokens.
    assert value(text, "sparseserve_request_activated_params_per_token_count", **m) == 3
    assert value(text, "sparseserve_request_activated_params_per_token_sum", **m) == pytest.approx(
        sum(s.mean_activated_params for s in fed))
    assert value(text, "sparseserve_request_ffn_sparsity_sum", **m) == pytest.approx(sum(s.mean_ffn_sparsity for s in fed))
    assert value(text, "sparseserve_request_computed_fraction_sum", **m) == pytest.approx(
        sum(s.mean_computed_fraction for s in fed))
    assert value(text, "sparseserve_activated_params_total", **m) == pytest.approx(
        sum(s.mean_activated_params * s.num_generated_tokens for s in fed))
    # The engine's computed params per token, times the tokens; nothing re-derived here.
    assert value(text, "sparseserve_computed_params_total", **m) == pytest.approx(
        sum(s.mean_computed_params * s.num_generated_tokens for s in fed))
    assert value(text, "sparseserve_request_read_bytes_per_token_count", **m) == 3
    assert value(text, "sparseserve_request_read_bytes_per_token_sum", **m) == pytest.approx(
        sum(s.read_bytes / s.num_generated_tokens for s in fed))
    # Per-step read counters move with steps only (each step once), never with requests.
    assert value(text, "sparseserve_read_bytes_total", **m) == 0
    assert value(text, "sparseserve_model_params", **m) == 10_000


def test_histogram_buckets_place_observations():
    metrics = ServerMetrics(MODEL, num_layers=1)
    metrics.observe_request_finished(make_request(sparsity=0.9, computed=0.3, total=2_000_000, ffn=1_500_000,
                                                  finish_reasons=["stop"]))
    text = render(metrics)
    m = {"model_name": MODEL}
    # 0.9 and 0.3 sit exactly on bucket bounds (le is inclusive); 650k params are in (5e5, 1e6].
    assert bucket(text, "sparseserve_request_ffn_sparsity", 0.85, **m) == 0
    assert bucket(text, "sparseserve_request_ffn_sparsity", 0.9, **m) == 1
    assert bucket(text, "sparseserve_request_computed_fraction", 0.2, **m) == 0
    assert bucket(text, "sparseserve_request_computed_fraction", 0.3, **m) == 1
    assert bucket(text, "sparseserve_request_activated_params_per_token", 5e5, **m) == 0
    assert bucket(text, "sparseserve_request_activated_params_per_token", 1e6, **m) == 1
    assert bucket(text, "sparseserve_request_activated_params_per_token", float("inf"), **m) == 1


def test_request_without_tokens_reports_no_sparsity():
    metrics = ServerMetrics(MODEL, num_layers=1)
    aborted = RequestStats(arrival_time=5.0, scheduled_time=5.5, finished_time=6.0, num_prompt_tokens=9,
                           total_params=10_000, finish_reasons=["abort"])
    metrics.observe_request_finished(aborted)
    text = render(metrics)
    m = {"model_name": MODEL}
    assert value(text, "sparseserve_request_success_total", finished_reason="abort", **m) == 1
    assert value(text, "sparseserve_time_to_first_token_seconds_count", **m) == 0
    assert value(text, "sparseserve_e2e_request_latency_seconds_sum", **m) == pytest.approx(1.0)
    assert value(text, "sparseserve_request_ffn_sparsity_count", **m) == 0
    assert value(text, "sparseserve_activated_params_total", **m) == 0


def test_read_counters_add_each_step_once():
    metrics = ServerMetrics(MODEL, num_layers=1)
    for read in (1_000, 2_500):
        metrics.observe_step(StepStats(duration_s=0.01, num_seqs=2, num_prefill_tokens=0, num_decode_tokens=2,
                                       num_generated_tokens=2, read_params=read, read_bytes=2 * read,
                                       dense_bytes=20_000))
    text = render(metrics)
    m = {"model_name": MODEL}
    assert value(text, "sparseserve_read_params_total", **m) == 3_500
    assert value(text, "sparseserve_read_bytes_total", **m) == 7_000
    assert value(text, "sparseserve_model_weight_bytes", **m) == 20_000


def test_steps_phases_batches_and_layer_ema():
    metrics = ServerMetrics(MODEL, num_layers=2)
    steps = [
        StepStats(duration_s=0.2, num_seqs=2, num_prefill_tokens=30, num_decode_tokens=0, num_generated_tokens=2,
                  per_layer_active_fraction=[0.1, 0.3], per_layer_computed_fraction=[0.2, 0.5]),
        StepStats(duration_s=0.05, num_seqs=3, num_prefill_tokens=0, num_decode_tokens=3, num_generated_tokens=3,
                  per_layer_active_fraction=[0.2, 0.1], per_layer_computed_fraction=[0.4, 0.3],
                  predictor_recall=[0.9, 0.8], predictor_precision=[0.6, 0.7]),
        StepStats(duration_s=0.1, num_seqs=4, num_prefill_tokens=10, num_decode_tokens=2, num_generated_tokens=2),
    ]
    for step in steps:
        metrics.observe_step(step)
    text = render(metrics)
    m = {"model_name": MODEL}
    for phase, duration in (("prefill", 0.2), ("decode", 0.05), ("mixed", 0.1)):
        assert value(text, "sparseserve_step_duration_seconds_count", phase=phase, **m) == 1
        assert value(text, "sparseserve_step_duration_seconds_sum", phase=phase, **m) == pytest.approx(duration)
    assert value(text, "sparseserve_batch_size_sum", **m) == 9
    assert value(text, "sparseserve_batch_size_count", **m) == 3
    assert value(text, "sparseserve_generation_tokens_total", **m) == 7
    a = LAYER_EMA_ALPHA
    # The first step sets the average, the second moves it by alpha; the third has no layer data.
    assert value(text, "sparseserve_ffn_sparsity", layer="0", **m) == pytest.approx(1 - (0.1 + a * (0.2 - 0.1)))
    assert value(text, "sparseserve_ffn_sparsity", layer="1", **m) == pytest.approx(1 - (0.3 + a * (0.1 - 0.3)))
    assert value(text, "sparseserve_ffn_computed_fraction", layer="1", **m) == pytest.approx(0.5 + a * (0.3 - 0.5))
    assert value(text, "sparseserve_predictor_recall", layer="0", **m) == pytest.approx(0.9)
    assert value(text, "sparseserve_predictor_precision", layer="1", **m) == pytest.approx(0.7)
    assert value(text, "sparseserve_predictor_shadow_checks_total", **m) == 1
    metrics.observe_step(StepStats(duration_s=0.01, num_seqs=1, num_prefill_tokens=0, num_decode_tokens=1,
                                   num_generated_tokens=1, predictor_recall=[0.5, 0.8], predictor_precision=[0.6, 0.7]))
    text = render(metrics)
    assert value(text, "sparseserve_predictor_recall", layer="0", **m) == pytest.approx(0.9 + PREDICTOR_EMA_ALPHA * (0.5 - 0.9))
    assert value(text, "sparseserve_predictor_shadow_checks_total", **m) == 2


def test_layer_mismatch_is_logged_and_extra_layers_ignored(caplog):
    metrics = ServerMetrics(MODEL, num_layers=1)
    with caplog.at_level(logging.WARNING, logger="sparse_serve.server.metrics"):
        metrics.observe_step(StepStats(duration_s=0.01, num_seqs=1, num_prefill_tokens=0, num_decode_tokens=1,
                                       num_generated_tokens=1, per_layer_active_fraction=[0.5, 0.5, 0.5]))
    assert "3 per-layer values for a 1-layer model" in caplog.text
    layers = {dict(labels)["layer"] for name, labels in samples(render(metrics)) if name == "sparseserve_ffn_sparsity"}
    assert layers == {"0"}


def test_engine_stats_gauges_and_monotonic_counters():
    metrics = ServerMetrics(MODEL, num_layers=1)
    m = {"model_name": MODEL}
    names = ("sparseserve_num_preemptions_total", "sparseserve_prefix_cache_queries_total",
             "sparseserve_prefix_cache_hits_total")
    # Cumulative engine values; the last snapshot comes from a restarted engine (back to small values).
    snapshots = [(0, 0, 0), (3, 100, 40), (3, 100, 40), (5, 180, 90), (1, 20, 5)]
    expected = [(0, 0, 0), (3, 100, 40), (3, 100, 40), (5, 180, 90), (6, 200, 95)]
    previous = (0, 0, 0)
    for (preempt, queries, hits), want in zip(snapshots, expected):
        metrics.update_engine_stats(EngineStats(num_running=2, num_waiting=preempt, kv_cache_usage=0.25,
                                                num_preemptions=preempt, prefix_cache_queries=queries,
                                                prefix_cache_hits=hits))
        text = render(metrics)
        got = tuple(value(text, name, **m) for name in names)
        assert got == want
        assert all(g >= p for g, p in zip(got, previous)), "a counter went backwards"
        previous = got
        assert value(text, "sparseserve_num_requests_waiting", **m) == preempt
    assert value(text, "sparseserve_num_requests_running", **m) == 2
    assert value(text, "sparseserve_kv_cache_usage_perc", **m) == 0.25
    assert "sparseserve_cache_config_info" not in sample_names(text)      # no cache geometry known yet
    metrics.update_engine_stats(EngineStats(num_total_blocks=64, num_free_blocks=64, block_size=16))
    assert value(render(metrics), "sparseserve_cache_config_info", block_size="16", num_gpu_blocks="64", **m) == 1


def test_http_requests_by_route_and_status():
    metrics = ServerMetrics(MODEL, num_layers=1)
    for route, status in [("/v1/chat/completions", 200)] * 3 + [("/v1/chat/completions", 400), ("/health", 503)]:
        metrics.observe_http(route, status)
    text = render(metrics)
    m = {"model_name": MODEL}
    assert value(text, "sparseserve_http_requests_total", route="/v1/chat/completions", status="200", **m) == 3
    assert value(text, "sparseserve_http_requests_total", route="/v1/chat/completions", status="400", **m) == 1
    assert value(text, "sparseserve_http_requests_total", route="/health", status="503", **m) == 1


def test_instances_have_their_own_registries():
    first, second = ServerMetrics("a", 1), ServerMetrics("b", 1)
    first.observe_http("/health", 200)
    assert first.registry is not second.registry
    assert "sparseserve_http_requests_total" in sample_names(render(first))
    assert "sparseserve_http_requests_total" not in sample_names(render(second))
    assert all(dict(labels).get("model_name") in ("a", None) for _, labels in samples(render(first)))
