"""Prometheus metrics for /metrics: serving basics (named after vLLM's) plus the sparsity story.

Every metric is prefixed `sparseserve_` and labelled with `model_name`. The server calls:
`observe_http` per HTTP response, `observe_request_finished` once per finished request (its
`RequestStats`, with the finish reasons of its choices), `observe_step` from the engine's step
listener, `update_engine_stats` before rendering, and `render` to serve /metrics.

Sparsity accounting: the engine computes every number (engine/core/sparsity.py, the formulas in
docs/SPARSITY.md); nothing here re-derives one.
- activated params, per generated token: `RequestStats.mean_activated_params`
  = total - inactive neurons * 3 * hidden.
- computed params, per generated token: `RequestStats.mean_computed_params`, the params the step
  that produced the token read (FFN rows as its kernels reported them, predictors when they ran,
  the rest whole). `computed >= activated` always; the gap
  (`sparseserve_computed_params_total - sparseserve_activated_params_total`) is the cost of
  batching, of predicting more neurons than fire, and of dense fallbacks.
- The counters `sparseserve_{activated,computed}_params_total` add mean * num_generated_tokens,
  so `rate(activated) / rate(sparseserve_request_generation_tokens_sum)` is the fleet-wide mean.
- read params / bytes: `sparseserve_read_{params,bytes}_total` count what every engine step read,
  once per step (the hardware's total); a request's own share (by its tokens in each step) is in
  its usage and in `sparseserve_request_read_bytes_per_token`.
"""
from __future__ import annotations

import logging
import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sparse_serve.engine.core.outputs import EngineStats, RequestStats, StepStats

logger = logging.getLogger(__name__)

PREFIX = "sparseserve_"

# NOTE: bucket choices. Latency buckets span a CPU host serving a tiny model (ms) to a 7B model
# under load on a GPU (minutes of queueing); each is roughly 2-2.5x the previous one so that
# histogram_quantile interpolates within ~20% while keeping series per histogram under 20.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Decode steps: ~5-30 ms per token on a GPU, 30-300 ms on a CPU.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0)
# Sequences per step: powers of two up to a large max_num_seqs.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_COUNT_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)
# Activated params per token: model sizes go from tiny test models (~1e4) to tens of billions,
# and the bucket set cannot depend on the model (it is fixed before the first request), so a
# 1-2-5 series per decade. The model-independent resolution comes from the sparsity histogram.
PARAMS_BUCKETS = tuple(m * 10.0**e for e in range(4, 12) for m in (1, 2, 5))
# Sparsity clusters high (ReLU-fied ~0.7-0.9, TurboSparse ~0.9), so the buckets get finer there.
SPARSITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0)
# Bytes of weights read per generated token: 1-2-5 per decade from tiny models to 100 GB.
BYTES_BUCKETS = tuple(m * 10.0**e for e in range(4, 12) for m in (1, 2, 5))
# Share of the FFN rows a step read: small for a lone sparse request, growing towards 1 with batch size.
FRACTION_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

# NOTE: per-layer gauges are exponential moving averages over steps. Steps are frequent (tens per
# second), so layer sparsity uses a small weight (~20 steps of memory); shadow checks of the
# predictor are rare (1 step in ~100), so their recall/precision averages react faster.
LAYER_EMA_ALPHA = 0.05
PREDICTOR_EMA_ALPHA = 0.2
FINISH_REASONS = ("stop", "length", "abort", "error")
# Structured outputs: what the client asked for (a forced tool call is "tool_call").
STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "tool_call")
# Grammar compiles: ~1-10 ms for typical schemas, seconds for large ones.
COMPILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PHASES = ("prefill", "decode", "mixed")


def _inter_token_latencies(token_times: list[float]) -> list[float]:
    # NOTE: with n > 1 choices a step emits several tokens at the same instant; the latency a
    # client sees per choice is the gap between steps, so identical times count once.
    times = sorted(set(token_times))
    return [b - a for a, b in zip(times, times[1:])]


class _LayerEma:
    """Per-layer exponential moving averages published through a gauge labelled by layer."""

    def __init__(self, gauge: Gauge, name: str, model_name: str, num_layers: int, alpha: float,
                 transform=lambda value: value):
        self.gauge, self.name, self.model_name = gauge, name, model_name
        self.num_layers, self.alpha, self.transform = num_layers, alpha, transform
        self.values: list[float | None] = [None] * num_layers
        self.warned = False

    def update(self, values: list[float]) -> None:
        if len(values) != self.num_layers and not self.warned:
            logger.warning("%s: got %d per-layer values for a %d-layer model; extra values are ignored",
                           self.name, len(values), self.num_layers)
            self.warned = True
        for layer, value in enumerate(values[: self.num_layers]):
            prev = self.values[layer]
            smoothed = value if prev is None else prev + self.alpha * (value - prev)
            self.values[layer] = smoothed
            self.gauge.labels(model_name=self.model_name, layer=str(layer)).set(self.transform(smoothed))


class ServerMetrics:
    """All of sparse-serve's Prometheus collectors, in one registry owned by this instance."""

    def __init__(self, model_name: str, num_layers: int, registry: CollectorRegistry | None = None):
        self.model_name = model_name
        self.num_layers = num_layers
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()   # guards the EMAs and the cumulative-value bookkeeping
        self._last_cumulative = {"preemptions": 0, "prefix_queries": 0, "prefix_hits": 0, "step_failures": 0}
        m = ("model_name",)

        def counter(name, doc, labels=m):
            return Counter(PREFIX + name, doc, labels, registry=self.registry)

        def gauge(name, doc, labels=m):
            return Gauge(PREFIX + name, doc, labels, registry=self.registry)

        def histogram(name, doc, buckets, labels=m):
            return Histogram(PREFIX + name, doc, labels, registry=self.registry, buckets=buckets)

        def layer_ema(name, doc, alpha, **kwargs):
            return _LayerEma(gauge(name, doc, m + ("layer",)), PREFIX + name, model_name, num_layers, alpha,
                             **kwargs)

        # Serving basics (vLLM's names with our prefix).
        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc",
                                    "KV cache usage as a fraction 0-1 (used blocks / all blocks).")
        # vLLM's info gauge (value 1, the facts in labels), which load-aware routers read for the
        # cache geometry; num_gpu_blocks keeps vLLM's label name on a CPU too.
        self.cache_config_info = gauge("cache_config_info", "KV cache configuration (value 1; the labels).",
                                       m + ("block_size", "num_gpu_blocks"))
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.num_preemptions = counter("num_preemptions", "Sequences preempted (KV blocks reclaimed).")
        self.engine_step_failures = counter(
            "engine_step_failures", "Engine steps that raised; the requests of each failed alone (HTTP 500).")
        self.engine_dead = gauge("engine_dead", "1 once the engine stopped for good (/health answers 503): "
                                 "several steps failed in a row, or the loop itself broke. Restart the replica.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests (cached ones included).")
        self.generation_tokens = counter("generation_tokens", "Tokens sampled, counted per engine step.")
        self.request_success = counter("request_success", "Finished choices by finish reason.",
                                       m + ("finished_reason",))
        self.http_requests = counter("http_requests", "HTTP responses by route and status code.",
                                     m + ("route", "status"))
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive token emissions.",
                             ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", E2E_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduling.", QUEUE_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per finished request.",
                                               TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request (all choices).", TOKEN_COUNT_BUCKETS)
        self.step_duration = histogram("step_duration_seconds", "Engine step duration by phase.", STEP_BUCKETS,
                                       m + ("phase",))
        self.batch_size = histogram("batch_size", "Sequences per engine step.", BATCH_BUCKETS)

        # Sparsity.
        self.model_params = gauge("model_params", "Total parameters of the served model.")
        self.activated_params_per_token = histogram(
            "request_activated_params_per_token", "Mean activated params per generated token, per request.",
            PARAMS_BUCKETS)
        self.ffn_sparsity = histogram(
            "request_ffn_sparsity", "Mean FFN sparsity (inactive / all neurons) per generated token, per request.",
            SPARSITY_BUCKETS)
        self.computed_fraction = histogram(
            "request_computed_fraction",
            "Mean share of the FFN weight rows (gate, up, down) read by the steps that produced the "
            "request's tokens, per request (docs/SPARSITY.md).", FRACTION_BUCKETS)
        self.activated_params = counter(
            "activated_params", "Activated params (whose contribution is non-zero: total - silent FFN neurons "
            "* 3 * hidden) summed over generated tokens.")
        self.computed_params = counter(
            "computed_params", "Computed params (read by the step that produced the token: total - FFN params "
            "+ FFN rows read * hidden + predictor params read) summed over generated tokens.")
        self.read_params = counter(
            "read_params", "Params read by engine steps, each step once (computed params per step; docs/SPARSITY.md).")
        self.read_bytes = counter(
            "read_bytes", "Bytes of weights read by engine steps, each step once (the read params at their stored sizes).")
        self.model_weight_bytes = gauge(
            "model_weight_bytes", "Bytes of the model's weights (predictors excluded): what a dense step reads.")
        self.read_bytes_per_token = histogram(
            "request_read_bytes_per_token", "The request's share (by its tokens, prompt included) of the weight "
            "bytes its steps read, per generated token, per request.", BYTES_BUCKETS)
        self._layer_sparsity = layer_ema("ffn_sparsity", "FFN sparsity per layer (EMA over steps).",
                                         LAYER_EMA_ALPHA, transform=lambda active: 1.0 - active)
        self._layer_computed = layer_ema("ffn_computed_fraction",
                                         "Share of the layer's FFN weight rows (gate, up, down) the step read "
                                         "(EMA over steps).", LAYER_EMA_ALPHA)
        self._recall = layer_ema("predictor_recall", "Predictor recall per layer from shadow checks (EMA).",
                                 PREDICTOR_EMA_ALPHA)
        self._precision = layer_ema("predictor_precision", "Predictor precision per layer from shadow checks (EMA).",
                                    PREDICTOR_EMA_ALPHA)
        self.predictor_shadow_checks = counter("predictor_shadow_checks",
                                               "Steps checked against the exact activation.")

        # Structured outputs.
        self.structured_requests = counter("structured_output_requests",
                                           "Requests with a constrained output, by what constrained it.",
                                           m + ("kind",))
        self.grammar_compile = histogram("grammar_compile_seconds",
                                         "Grammar compile time (cache misses; hits cost nothing).",
                                         COMPILE_BUCKETS)

        # NOTE: touch every fixed child now so that rate() has a zero to start from.
        for metric in (self.prefix_cache_queries, self.prefix_cache_hits, self.num_preemptions, self.prompt_tokens,
                       self.engine_step_failures, self.engine_dead,
                       self.generation_tokens, self.activated_params, self.computed_params,
                       self.read_params, self.read_bytes, self.model_weight_bytes, self.read_bytes_per_token,
                       self.predictor_shadow_checks, self.num_requests_running, self.num_requests_waiting,
                       self.kv_cache_usage, self.model_params, self.ttft, self.itl, self.e2e, self.queue_time,
                       self.request_prompt_tokens, self.request_generation_tokens, self.batch_size,
                       self.activated_params_per_token, self.ffn_sparsity, self.computed_fraction):
            metric.labels(model_name=model_name)
        for reason in FINISH_REASONS:
            self.request_success.labels(model_name=model_name, finished_reason=reason)
        for phase in PHASES:
            self.step_duration.labels(model_name=model_name, phase=phase)
        for kind in STRUCTURED_KINDS:
            self.structured_requests.labels(model_name=model_name, kind=kind)
        self.grammar_compile.labels(model_name=model_name)

    def observe_http(self, route: str, status: int) -> None:
        # NOTE: `route` must be the route template (e.g. /v1/chat/completions), never a raw path,
        # or a scanner hitting random URLs would create unbounded series.
        self.http_requests.labels(model_name=self.model_name, route=route, status=str(int(status))).inc()

    def observe_request_finished(self, stats: RequestStats) -> None:
        name = self.model_name
        for reason in stats.finish_reasons:
            self.request_success.labels(model_name=name, finished_reason=reason).inc()
        self.prompt_tokens.labels(model_name=name).inc(stats.num_prompt_tokens)
        self.request_prompt_tokens.labels(model_name=name).observe(stats.num_prompt_tokens)
        self.request_generation_tokens.labels(model_name=name).observe(stats.num_generated_tokens)
        timings = ((stats.ttft, self.ttft), (stats.e2e_latency, self.e2e), (stats.queue_time, self.queue_time))
        for value, hist in timings:
            if value is not None:
                hist.labels(model_name=name).observe(max(0.0, value))
        itl = self.itl.labels(model_name=name)
        for gap in _inter_token_latencies(stats.token_times):
            itl.observe(gap)
        if stats.total_params:
            self.model_params.labels(model_name=name).set(stats.total_params)
        # NOTE: a request aborted before its first token has no sparsity to report; observing its
        # zero means would drag the distributions towards "dense".
        if stats.num_generated_tokens <= 0 or stats.total_params <= 0:
            return
        self.activated_params_per_token.labels(model_name=name).observe(stats.mean_activated_params)
        self.ffn_sparsity.labels(model_name=name).observe(stats.mean_ffn_sparsity)
        self.computed_fraction.labels(model_name=name).observe(stats.mean_computed_fraction)
        self.activated_params.labels(model_name=name).inc(stats.mean_activated_params * stats.num_generated_tokens)
        self.computed_params.labels(model_name=name).inc(stats.mean_computed_params * stats.num_generated_tokens)
        self.read_bytes_per_token.labels(model_name=name).observe(stats.read_bytes / stats.num_generated_tokens)

    def observe_structured(self, kind: str, compile_seconds: float | None) -> None:
        """A constrained request was accepted; `compile_seconds` is None on a cache hit."""
        self.structured_requests.labels(model_name=self.model_name, kind=kind).inc()
        if compile_seconds is not None:
            self.grammar_compile.labels(model_name=self.model_name).observe(compile_seconds)

    def observe_step(self, step: StepStats) -> None:
        name = self.model_name
        self.step_duration.labels(model_name=name, phase=step.phase).observe(max(0.0, step.duration_s))
        self.batch_size.labels(model_name=name).observe(step.num_seqs)
        self.generation_tokens.labels(model_name=name).inc(step.num_generated_tokens)
        self.read_params.labels(model_name=name).inc(step.read_params)
        self.read_bytes.labels(model_name=name).inc(step.read_bytes)
        if step.dense_bytes:
            self.model_weight_bytes.labels(model_name=name).set(step.dense_bytes)
        with self._lock:
            if step.per_layer_active_fraction:
                self._layer_sparsity.update(step.per_layer_active_fraction)
            if step.per_layer_computed_fraction:
                self._layer_computed.update(step.per_layer_computed_fraction)
            if step.predictor_recall is not None:
                self._recall.update(step.predictor_recall)
                self.predictor_shadow_checks.labels(model_name=name).inc()
            if step.predictor_precision is not None:
                self._precision.update(step.predictor_precision)

    def update_engine_stats(self, stats: EngineStats) -> None:
        name = self.model_name
        self.num_requests_running.labels(model_name=name).set(stats.num_running)
        self.num_requests_waiting.labels(model_name=name).set(stats.num_waiting)
        self.kv_cache_usage.labels(model_name=name).set(stats.kv_cache_usage)
        if stats.num_total_blocks and stats.block_size:
            self.cache_config_info.labels(model_name=name, block_size=str(stats.block_size),
                                          num_gpu_blocks=str(stats.num_total_blocks)).set(1)
        self.engine_dead.labels(model_name=name).set(int(stats.dead))
        with self._lock:
            for key, value, counter in (("preemptions", stats.num_preemptions, self.num_preemptions),
                                        ("step_failures", stats.num_step_failures, self.engine_step_failures),
                                        ("prefix_queries", stats.prefix_cache_queries, self.prefix_cache_queries),
                                        ("prefix_hits", stats.prefix_cache_hits, self.prefix_cache_hits)):
                counter.labels(model_name=name).inc(self._cumulative_delta(key, value))

    def _cumulative_delta(self, key: str, value: int) -> int:
        """Increment for a counter fed from a since-start engine value. A value below the last one
        means the engine restarted from zero: the whole new value is new (Prometheus' own rule)."""
        last = self._last_cumulative[key]
        self._last_cumulative[key] = value
        if value < last:
            logger.info("engine counter %s went back from %d to %d; treating it as a restart", key, last, value)
            return value
        return value - last

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
