"""bench/serve.py, the load generator, against a real server on the tiny random checkpoint.

A handful of short requests per mode keeps this under ~15 s on 2 shared cores; what is checked
is that the bookkeeping is consistent (counts, token totals, percentile order), not speed.
"""
from __future__ import annotations

import asyncio

import pytest

from sparse_serve.bench.serve import (
    TABLE_COLUMNS,
    LoadSpec,
    make_prompts,
    markdown_header,
    markdown_row,
    percentile,
    poisson_arrivals,
    run_load,
    run_load_sync,
)

MAX_TOKENS = 6
# ignore_eos: a random model stops early at random; with it, every request has MAX_TOKENS.
EQUAL_LENGTHS = {"ignore_eos": True}


def check_consistent(report: dict, requests: int) -> None:
    assert report["errors"] == 0, report["first_error"]
    assert report["first_error"] is None
    assert report["sent"] == report["completed"] == requests
    assert report["cancelled"] == 0
    assert report["length_mismatches"] == 0
    assert report["output_tokens"] == report["completed_output_tokens"] == requests * MAX_TOKENS
    assert report["output_tok_s"] == pytest.approx(report["output_tokens"] / report["elapsed_s"],
                                                   rel=0.01)
    assert report["req_s"] == pytest.approx(requests / report["elapsed_s"], rel=0.01)
    for metric in ("ttft", "itl", "e2e"):
        p50, p99 = report[f"{metric}_p50_ms"], report[f"{metric}_p99_ms"]
        assert p50 is not None and 0 < p50 <= p99, metric
    assert report["ttft_p99_ms"] <= report["e2e_p99_ms"]
    assert report["elapsed_s"] * 1000 >= report["e2e_p99_ms"]


def per_request_checks(run) -> None:
    """Each finished request: its own tokens, TTFT <= e2e, and chunk gaps inside e2e - TTFT."""
    for result in run.results:
        assert result.ok and result.output_tokens == MAX_TOKENS
        assert 0 < result.ttft <= result.e2e
        assert len(result.gaps) <= MAX_TOKENS - 1
        assert sum(result.gaps) <= result.e2e - result.ttft + 1e-6


def test_closed_loop(live_server):
    spec = LoadSpec(base_url=live_server.url, requests=8, concurrency=4, max_tokens=MAX_TOKENS,
                    extra_body=EQUAL_LENGTHS, time_limit_s=30, label="tiny")
    run = asyncio.run(run_load(spec))
    per_request_checks(run)
    report = run.as_dict()
    check_consistent(report, 8)
    assert report["mode"] == "closed 4"
    row = markdown_row(report)
    assert row.startswith("| tiny | closed 4 | 8/8 | 0 |")
    assert row.count("|") == len(TABLE_COLUMNS) + 1 == markdown_header().splitlines()[0].count("|")


def test_poisson_completions(live_server):
    # The legacy endpoint and open-loop arrivals; /v1 in the URL is accepted too.
    spec = LoadSpec(base_url=live_server.base_url, requests=6, rate=20.0, concurrency=None,
                    endpoint="completions", max_tokens=MAX_TOKENS, extra_body=EQUAL_LENGTHS,
                    time_limit_s=30, seed=3)
    run = asyncio.run(run_load(spec))
    per_request_checks(run)
    check_consistent(run.as_dict(), 6)
    # Requests were sent no earlier than their seeded arrival times.
    arrivals = poisson_arrivals(6, 20.0, seed=3)
    first = min(r.start for r in run.results)
    for result, at in zip(run.results, arrivals):
        assert result.start - first >= at - arrivals[0] - 0.005


def test_time_limit_stops_the_run(live_server):
    # Far more requests than fit in the limit: the run stops by itself, cancels what is in
    # flight (not counted as errors), and keeps the tokens those streamed in the throughput.
    spec = LoadSpec(base_url=live_server.url, requests=10_000, concurrency=2, max_tokens=64,
                    extra_body=EQUAL_LENGTHS, time_limit_s=1.0, warmup=0)
    report = run_load_sync(spec)
    assert report["errors"] == 0, report["first_error"]
    assert report["elapsed_s"] <= 1.0 + 1e-6
    assert report["sent"] < 10_000
    assert report["cancelled"] >= 1
    assert report["sent"] == report["completed"] + report["cancelled"]
    assert report["output_tokens"] >= report["completed_output_tokens"]


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://localhost:8000",
                                 "http://10.0.0.1:8000/v1", "https://127.0.0.1:8000",
                                 "http://127.0.0.1.example.com"])
def test_non_loopback_targets_are_refused(url):
    with pytest.raises(ValueError, match="only http://127.0.0.1"):
        LoadSpec(base_url=url)
    # Also when a spec is altered after construction: run_load checks again before connecting.
    spec = LoadSpec(base_url="http://127.0.0.1:9")
    spec.base_url = url
    with pytest.raises(ValueError, match="only http://127.0.0.1"):
        asyncio.run(run_load(spec))


def test_prompts_arrivals_and_percentiles_are_deterministic():
    assert make_prompts(30, seed=1) == make_prompts(30, seed=1) != make_prompts(30, seed=2)
    assert len(set(make_prompts(12, seed=0))) == 12  # one whole pass before any repeat
    arrivals = poisson_arrivals(200, 10.0, seed=0)
    assert arrivals == poisson_arrivals(200, 10.0, seed=0) and arrivals == sorted(arrivals)
    assert 200 / arrivals[-1] == pytest.approx(10.0, rel=0.25)
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


# ---------------------------------------------------------------- the compare driver's pieces

def test_comparison_table_ratios_to_ours():
    from sparse_serve.bench.serve_peers import comparison_table

    def report(label, tok_s, ttft, mismatches=0):
        return {"label": label, "mode": "closed 16", "sent": 4, "completed": 4, "errors": 0,
                "output_tok_s": tok_s, "req_s": 1.0, "ttft_p50_ms": ttft, "ttft_p99_ms": ttft,
                "itl_p50_ms": 10.0, "itl_p99_ms": 20.0, "e2e_p50_ms": 500.0, "e2e_p99_ms": 600.0,
                "length_mismatches": mismatches}

    table = comparison_table([report("ours", 80.0, 100.0), report("peer", 40.0, 300.0, 2)])
    header, rule, ours, peer = table.splitlines()
    assert header.count("|") == rule.count("|") == ours.count("|") == peer.count("|")
    assert ours.endswith("| 1.00x | 1.00x | 1.00x | yes |")
    assert peer.endswith("| 0.50x | 3.00x | 1.00x | no (2 differ) |")


def test_missing_llama_cpp_is_skipped_with_install_hint():
    import importlib.util
    import sys

    from sparse_serve.bench.serve_peers import Skip, servers
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama_cpp is importable here")
    with pytest.raises(Skip, match=r"llama-cpp-python\[server\].*--llama-python"):
        servers(64, sys.executable)["llama.cpp"].command(12345)
