"""Issue 7's live proofs: the real server (real AsyncEngine, tiny dReLU model with predictors) under
bounded traffic on 127.0.0.1; its /metrics passes `promtool check metrics`, its numbers match what
the responses said, and a real Prometheus scraping it returns the activated-params counter.

Every expected number comes from the HTTP responses the test received (status codes, finish
reasons, usage fields), never from the server's internals, so a metric that drifts from what the
API reports fails here.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from sparse_serve.server import cli
from tests.live_server import LiveServer, small_config, tiny_engine
from tests.tiny_checkpoint import make_tiny_checkpoint

from .exposition import samples, value
from .promtools import promtool, running_prometheus

logger = logging.getLogger(__name__)

MODEL = "tiny-sparse"
API_KEY = "live-metrics-key"
NUM_LAYERS = 2
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
METRICS = "/metrics"


@pytest.fixture(scope="module")
def drelu_model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("live") / MODEL, "drelu", predictor_rank=16,
                                num_layers=NUM_LAYERS, max_position_embeddings=256)


def live_config():
    """The config as `sparse-serve serve` would build it from these flags (the shadow-rate flag
    included), on top of the test limits."""
    args = cli.build_parser().parse_args(["serve", "--served-model-name", MODEL, "--api-key", API_KEY,
                                          "--predictor-shadow-rate", "1.0", "--block-size", "4"])
    flags = {key: val for key, val in cli.config_overrides(args, environ={}).items() if val is not None}
    return small_config(**flags)


@pytest.fixture
def live(drelu_model_dir):
    config = live_config()
    assert config.server.predictor_shadow_rate == 1.0
    with LiveServer(tiny_engine(config, drelu_model_dir), config) as server:
        yield server


@dataclass
class Traffic:
    """What the client saw: HTTP statuses, finish reasons and usage of every answered request."""
    http: Counter = field(default_factory=Counter)          # (route, status) -> responses
    finish_reasons: Counter = field(default_factory=Counter)
    usages: list[dict[str, Any]] = field(default_factory=list)

    def total(self, key: str) -> int:
        return sum(u[key] for u in self.usages)

    def activated_params_sum(self) -> float:
        return sum(u["activated_params"] * u["completion_tokens"] for u in self.usages)


class Client:
    def __init__(self, server: LiveServer, traffic: Traffic) -> None:
        self.http = httpx.Client(base_url=server.url, timeout=30.0,
                                 headers={"Authorization": f"Bearer {API_KEY}"})
        self.traffic = traffic

    def post(self, route: str, body: dict[str, Any], **kwargs) -> httpx.Response:
        response = self.http.post(route, json={"model": MODEL, **body}, **kwargs)
        self.traffic.http[(route, str(response.status_code))] += 1
        if response.status_code == 200:
            data = response.json()
            self.traffic.usages.append(data["usage"])
            self.traffic.finish_reasons.update(c["finish_reason"] for c in data["choices"])
        return response

    def stream(self, route: str, body: dict[str, Any], on_first_chunk=None) -> None:
        """A streamed request with usage; `on_first_chunk()` runs while the request is in flight."""
        body = {"model": MODEL, **body, "stream": True, "stream_options": {"include_usage": True}}
        finishes: dict[int, str] = {}
        usage = None
        with self.http.stream("POST", route, json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if on_first_chunk is not None:
                    on_first_chunk()
                    on_first_chunk = None
                for choice in chunk["choices"]:
                    if choice.get("finish_reason"):
                        finishes[choice["index"]] = choice["finish_reason"]
                usage = chunk.get("usage") or usage
        self.traffic.http[(route, "200")] += 1
        assert usage is not None, "the stream ended without a usage chunk"
        self.traffic.usages.append(usage)
        self.traffic.finish_reasons.update(finishes.values())

    def metrics(self) -> bytes:
        response = self.http.get(METRICS)
        assert response.status_code == 200
        self.traffic.http[(METRICS, "200")] += 1
        return response.content


def send_traffic(client: Client, in_flight_check=None) -> None:
    """Bounded: ten choices of at most 48 tokens each, one 400, one 401."""
    chat = {"messages": [{"role": "user", "content": "Hello sparse serving"}], "max_tokens": 6}
    assert client.post(CHAT, chat).status_code == 200
    # A long-ish stream that cannot stop early, so the in-flight scrape sees it running.
    client.stream(CHAT, {**chat, "max_tokens": 48, "n": 2, "ignore_eos": True}, on_first_chunk=in_flight_check)
    # n=2 where one choice hits the stop string early and the other runs to max_tokens: the early
    # finish_reason arrives in an earlier delta than the request's last one (seeded, so it does).
    early = client.post(COMPLETIONS, {"prompt": "The capital of France", "max_tokens": 8, "n": 2, "seed": 8,
                                      "stop": ["e"]}).json()
    assert sorted(c["finish_reason"] for c in early["choices"]) == ["length", "stop"], early
    assert early["usage"]["completion_tokens"] < 2 * 8, "the stopped choice should have finished earlier"
    client.stream(COMPLETIONS, {"prompt": "Neurons that are silent", "max_tokens": 7})
    # Concurrent requests, so steps batch several sequences (union cost > own cost).
    prompts = ["Hello world", "The capital of", "Neurons cost nothing", "café 東京"]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        codes = list(pool.map(lambda p: client.post(COMPLETIONS, {"prompt": p, "max_tokens": 8,
                                                                  "ignore_eos": True}).status_code, prompts))
    assert codes == [200] * len(prompts)
    assert client.post(COMPLETIONS, {"prompt": "x", "max_tokens": 4, "temperature": -1}).status_code == 400
    assert client.post(CHAT, chat, headers={"Authorization": "Bearer wrong-key"}).status_code == 401


def settled_metrics(client: Client, timeout_s: float = 10.0) -> bytes:
    """/metrics once the HTTP counters have caught up with the responses received (a response is
    counted after its last byte is sent) and the engine is idle again."""
    deadline = time.monotonic() + timeout_s
    while True:
        expected = Counter(client.traffic.http)     # this scrape is counted only after it renders
        body = client.metrics()
        caught_up = all(value(body, "sparseserve_http_requests_total", model_name=MODEL, route=route,
                              status=status) == count for (route, status), count in expected.items())
        idle = all(value(body, f"sparseserve_{name}", model_name=MODEL) == 0
                   for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"))
        if caught_up and idle:
            return body
        if time.monotonic() > deadline:
            return body   # the assertions below say what did not match
        time.sleep(0.05)


def test_a_stream_its_client_left_counts_as_aborted(live):
    # The client reads the first chunk of a long stream (n=2) and goes away: the server aborts
    # the request with no one reading it, and it still counts, once, as two "abort" choices,
    # with its prompt tokens and its latency observed like any finished request's.
    client = Client(live, Traffic())
    before = client.metrics()
    body = {"model": MODEL, "prompt": "Neurons that are silent", "max_tokens": 200, "n": 2,
            "ignore_eos": True, "stream": True}
    with client.http.stream("POST", COMPLETIONS, json=body) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data: "))

    def metric(scrape: bytes, name: str, **labels: str) -> float:
        return value(scrape, f"sparseserve_{name}", model_name=MODEL, **labels)

    def aborted(scrape: bytes) -> float:
        return (metric(scrape, "request_success_total", finished_reason="abort")
                - metric(before, "request_success_total", finished_reason="abort"))

    deadline = time.monotonic() + 10
    after = client.metrics()
    while (aborted(after) < 2 or metric(after, "num_requests_running") > 0) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
        after = client.metrics()
    assert aborted(after) == 2
    assert metric(after, "num_requests_running") == 0
    for reason in ("stop", "length"):
        assert metric(after, "request_success_total", finished_reason=reason) == metric(
            before, "request_success_total", finished_reason=reason)
    prompt_tokens = metric(after, "prompt_tokens_total") - metric(before, "prompt_tokens_total")
    assert prompt_tokens > 0
    for histogram in ("e2e_request_latency_seconds_count", "request_prompt_tokens_count"):
        assert metric(after, histogram) - metric(before, histogram) == 1, histogram


def per_layer(body: bytes, name: str) -> dict[str, float]:
    return {dict(labels)["layer"]: v for (sample, labels), v in samples(body).items() if sample == name}


def test_live_metrics_match_the_traffic(live):
    traffic = Traffic()
    client = Client(live, traffic)
    in_flight: list[bytes] = []
    send_traffic(client, in_flight_check=lambda: in_flight.append(client.metrics()))
    body = settled_metrics(client)

    result = promtool("check", "metrics", stdin=body)
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout.decode()}{result.stderr.decode()}"

    def metric(name: str, **labels: str) -> float:
        return value(body, f"sparseserve_{name}", model_name=MODEL, **labels)

    # HTTP responses by route and status: exactly what the client got, and nothing else.
    scraped_http = {(dict(labels)["route"], dict(labels)["status"]): count
                    for (name, labels), count in samples(body).items() if name == "sparseserve_http_requests_total"}
    assert scraped_http == {key: count for key, count in traffic.http.items() if key != (METRICS, "200")} | {
        (METRICS, "200"): traffic.http[(METRICS, "200")] - 1}
    assert scraped_http[(COMPLETIONS, "400")] == 1 and scraped_http[(CHAT, "401")] == 1

    # Finished choices by reason, tokens.
    assert sum(traffic.finish_reasons.values()) == 10   # choices: 1 + 2 + 2 + 1 + 4
    for reason in ("stop", "length", "abort"):
        assert metric("request_success_total", finished_reason=reason) == traffic.finish_reasons[reason], reason
    assert metric("prompt_tokens_total") == traffic.total("prompt_tokens")
    assert metric("generation_tokens_total") == traffic.total("completion_tokens")
    num_requests = len(traffic.usages)
    assert metric("request_generation_tokens_count") == num_requests
    assert metric("request_generation_tokens_sum") == traffic.total("completion_tokens")

    # Activated params: the counter is the sum of the usage fields (each rounded to an integer
    # per response, hence half a param per token of tolerance); the histogram has one sample per
    # finished request.
    tokens = traffic.total("completion_tokens")
    assert metric("activated_params_total") == pytest.approx(traffic.activated_params_sum(), abs=0.5 * tokens + 1e-6)
    assert metric("request_activated_params_per_token_count") == num_requests
    assert metric("request_activated_params_per_token_sum") == pytest.approx(
        traffic.total("activated_params"), abs=0.5 * num_requests + 1e-6)
    total_params = traffic.usages[0]["total_params"]
    assert metric("model_params") == total_params
    # dReLU is sparse: fewer params than the model. Computed params (what each token's step read:
    # predictors and, at shadow rate 1.0, a dense check pass included) are at least each
    # request's own; the counter sums what the responses said.
    assert 0 < metric("activated_params_total") < total_params * tokens
    assert all(u["computed_params"] >= u["activated_params"] for u in traffic.usages)
    assert metric("activated_params_total") <= metric("computed_params_total")
    assert metric("computed_params_total") == pytest.approx(
        sum(u["computed_params"] * u["completion_tokens"] for u in traffic.usages), abs=0.5 * tokens + 1e-6)
    # Every step's reads, shared among its requests by tokens, add up to the responses' shares.
    assert metric("read_params_total") == pytest.approx(traffic.total("read_params"), abs=0.5 * num_requests + 1e-6)
    assert metric("read_bytes_total") == pytest.approx(traffic.total("read_bytes"), abs=0.5 * num_requests + 1e-6)

    # Predictor shadow check at rate 1.0: every step checked, recall/precision per layer in [0, 1].
    num_steps = metric("batch_size_count")
    assert num_steps > 0 and metric("predictor_shadow_checks_total") == num_steps
    for name in ("predictor_recall", "predictor_precision", "ffn_sparsity"):
        layers = per_layer(body, f"sparseserve_{name}")
        assert set(layers) == {str(i) for i in range(NUM_LAYERS)}, name
        assert all(0.0 <= v <= 1.0 for v in layers.values()), (name, layers)

    # The gauges moved during traffic and went back to 0 after it.
    assert len(in_flight) == 1
    assert value(in_flight[0], "sparseserve_num_requests_running", model_name=MODEL) >= 1
    assert value(in_flight[0], "sparseserve_kv_cache_usage_perc", model_name=MODEL) > 0
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert metric(name) == 0, name


def test_real_prometheus_scrapes_the_live_server(live):
    traffic = Traffic()
    client = Client(live, traffic)
    query = f'sparseserve_activated_params_total{{model_name="{MODEL}"}}'
    with running_prometheus([live.host_port], scrape_interval="1s") as prometheus:
        before = prometheus.wait_for(query, timeout_s=20)        # scraped before any traffic: zero
        assert float(before[0]["value"][1]) == 0.0
        send_traffic(client)
        expected = traffic.activated_params_sum()
        tolerance = 0.5 * traffic.total("completion_tokens") + 1e-6
        result = prometheus.wait_for(
            query, timeout_s=20,
            predicate=lambda r: bool(r) and abs(float(r[0]["value"][1]) - expected) <= tolerance)
        assert result[0]["metric"]["job"] == "sparse-serve"
        assert expected > 0
        assert [t["health"] for t in prometheus.targets()] == ["up"]
