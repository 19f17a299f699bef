"""Async load generator for any OpenAI-compatible server on 127.0.0.1 (streaming requests).

Two arrival modes, both bounded by a request count and a wall-clock time limit:

- closed loop: `--concurrency N` clients, each sends its next request as soon as the previous
  one finished (what "N concurrent users" usually means);
- open loop: `--rate R` requests/s with Poisson arrivals (seeded exponential gaps), sent
  whether or not earlier ones finished, which shows queueing once R exceeds capacity.

Every request streams (SSE) from /v1/chat/completions (default) or /v1/completions with a fixed
`max_tokens`, greedy (temperature 0), a prompt drawn deterministically (seeded) from a fixed
list, and `extra_body` merged in: that is how equal output lengths are forced, per server
(`{"ignore_eos": true}` for ours; the peers' options live in bench/serve_peers.py).

Reported (as a dict, `LoadReport.as_dict()`, and as a markdown row, `markdown_row`): output
tok/s, req/s, TTFT p50/p99, inter-token latency p50/p99, end-to-end latency p50/p99, errors
(with the first error's text) and how many finished requests had a length other than
`max_tokens` (0 when forcing equal lengths works).

    python -P bench/serve.py run --url http://127.0.0.1:8000 --concurrency 16 --requests 32 \\
        --extra '{"ignore_eos": true}'
    python -P bench/serve.py run --url http://127.0.0.1:8000 --rate 2 --requests 20
    python -P bench/serve.py compare              # ours vs peers, see bench/serve_peers.py
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

# NOTE: loopback only, and spelled exactly: this tool fires hundreds of requests, and a typo in
# a URL must never aim that at somebody else's machine. "localhost" is refused too, because it
# can resolve to ::1 or, with a broken /etc/hosts, elsewhere.
ALLOWED_HOST = "127.0.0.1"
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

# Fixed prompts of different lengths and topics; the seed only picks the order, so every run
# and every server with the same seed gets the same sequence of prompts.
PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Explain, step by step and in plain words, how a refrigerator keeps food cold.",
    "List three facts about the Moon.",
    "Summarise the plot of a detective novel set in a small coastal town in winter, where the "
    "lighthouse keeper is the main suspect.",
    "What is the capital of France, and why is it famous?",
    "Describe the water cycle to a ten year old.",
    "Give me a recipe for a simple vegetable soup.",
    "Why is the sky blue? Answer in two paragraphs.",
    "Write a haiku about autumn leaves and then explain its imagery.",
    "Compare trains and aeroplanes for a 500 km journey.",
    "What are the main differences between a list and a tuple in Python?",
    "Tell me about the history of the bicycle.",
)


def check_loopback(url: str) -> None:
    """Raise ValueError unless `url` is http://127.0.0.1[:port][/...]."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname != ALLOWED_HOST:
        raise ValueError(f"refusing to load {url!r}: only http://{ALLOWED_HOST} targets are allowed")


def make_prompts(count: int, seed: int) -> list[str]:
    """`count` prompts from PROMPTS in a seeded order (whole shuffled passes, then repeats)."""
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < count:
        order = list(PROMPTS)
        rng.shuffle(order)
        prompts.extend(order)
    return prompts[:count]


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of `count` requests at `rate`/s; the first goes at 0."""
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def percentile(values: list[float], q: float) -> float | None:
    """q-th percentile (0-100) with linear interpolation (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class LoadSpec:
    base_url: str                        # http://127.0.0.1:PORT (a trailing /v1 is accepted)
    requests: int = 32                   # at most this many requests are sent
    concurrency: int | None = 1          # closed loop when rate is None
    rate: float | None = None            # Poisson arrivals, requests/s (open loop)
    time_limit_s: float = 60.0           # stops by itself after this (in-flight ones cancelled)
    max_tokens: int = 64
    endpoint: str = "chat"               # "chat" or "completions"
    model: str | None = None             # None: the first id of GET /v1/models
    seed: int = 0
    extra_body: dict[str, Any] = field(default_factory=dict)
    warmup: int = 1                      # unmeasured sequential requests first
    request_timeout_s: float = 300.0     # per request, a stalled stream counts as an error
    label: str = ""

    def __post_init__(self) -> None:
        check_loopback(self.base_url)
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {self.endpoint!r}")
        if self.rate is None and (self.concurrency is None or self.concurrency < 1):
            raise ValueError("give a concurrency >= 1 (closed loop) or a rate > 0 (Poisson)")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.requests < 1 or self.max_tokens < 1 or self.time_limit_s <= 0:
            raise ValueError("requests, max_tokens and time_limit_s must be positive")

    @property
    def root_url(self) -> str:
        url = self.base_url.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url

    @property
    def mode(self) -> str:
        return f"poisson {self.rate:g}/s" if self.rate is not None else f"closed {self.concurrency}"


@dataclass
class RequestResult:
    """One request; filled in while it streams, so a cancelled one keeps what it received."""
    index: int
    start: float = 0.0
    ttft: float | None = None            # s from send to the first non-empty text chunk
    e2e: float | None = None             # s from send to the end of the stream
    chunks: int = 0                      # non-empty text chunks
    usage_tokens: int | None = None      # completion_tokens of a usage chunk, when sent
    gaps: list[float] = field(default_factory=list)  # s between successive text chunks
    error: str | None = None
    cancelled: bool = False

    @property
    def output_tokens(self) -> int:
        # NOTE: the server's own count when it sends usage (stream_options.include_usage);
        # otherwise one token per text chunk, which is how these servers stream.
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def ok(self) -> bool:
        return self.error is None and not self.cancelled and self.e2e is not None


@dataclass
class LoadReport:
    spec: LoadSpec
    results: list[RequestResult]
    elapsed_s: float

    @property
    def completed(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def as_dict(self) -> dict[str, Any]:
        done = self.completed
        errors = [r for r in self.results if r.error is not None]
        ttft = [r.ttft for r in done if r.ttft is not None]
        e2e = [r.e2e for r in done if r.e2e is not None]
        # NOTE: inter-token latency pools every gap between successive text chunks of the
        # finished requests (as vLLM's benchmark does), so a stall shows in p99 instead of
        # being averaged away as in a per-request (e2e - ttft) / (tokens - 1).
        itl = [gap for r in done for gap in r.gaps]
        # NOTE: throughput counts every token received before the stop, cancelled requests'
        # included: when the time limit cuts a run, the tokens streamed so far were real work.
        tokens = sum(r.output_tokens for r in self.results)
        elapsed = max(self.elapsed_s, 1e-9)
        ms = lambda values, q: None if not values else round(1000 * percentile(values, q), 1)  # noqa: E731
        spec = self.spec
        return {
            "label": spec.label, "mode": spec.mode, "concurrency": spec.concurrency,
            "rate": spec.rate, "endpoint": spec.endpoint, "max_tokens": spec.max_tokens,
            "sent": len(self.results), "completed": len(done),
            "cancelled": sum(r.cancelled for r in self.results),
            "errors": len(errors), "first_error": errors[0].error if errors else None,
            "length_mismatches": sum(r.output_tokens != spec.max_tokens for r in done),
            "output_tokens": tokens, "completed_output_tokens": sum(r.output_tokens for r in done),
            "elapsed_s": round(self.elapsed_s, 3),
            "output_tok_s": round(tokens / elapsed, 2), "req_s": round(len(done) / elapsed, 3),
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "itl_p50_ms": ms(itl, 50), "itl_p99_ms": ms(itl, 99),
            "e2e_p50_ms": ms(e2e, 50), "e2e_p99_ms": ms(e2e, 99),
        }


TABLE_COLUMNS = ("server", "load", "done/sent", "errors", "out tok/s", "req/s", "TTFT p50 ms",
                 "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "e2e p50 ms", "e2e p99 ms")


def markdown_header() -> str:
    return "| " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * len(TABLE_COLUMNS)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def markdown_row(report: dict[str, Any]) -> str:
    """One table row (columns TABLE_COLUMNS) of an `as_dict()` report."""
    cells = [report["label"] or "-", report["mode"], f"{report['completed']}/{report['sent']}",
             report["errors"], report["output_tok_s"], report["req_s"], report["ttft_p50_ms"],
             report["ttft_p99_ms"], report["itl_p50_ms"], report["itl_p99_ms"],
             report["e2e_p50_ms"], report["e2e_p99_ms"]]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


# ---------------------------------------------------------------------------------- requests

def request_body(spec: LoadSpec, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if spec.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(spec.extra_body)
    return body


def _chunk_text(payload: dict[str, Any]) -> str:
    text = ""
    for choice in payload.get("choices") or ():
        delta = choice.get("delta")
        text += (delta.get("content") or "") if isinstance(delta, dict) else (choice.get("text") or "")
    return text


async def stream_one(client: httpx.AsyncClient, path: str, body: dict[str, Any],
                     result: RequestResult) -> None:
    """Send one streaming request and record its timings into `result` as they happen."""
    result.start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if "error" in payload:
                    result.error = f"stream error: {json.dumps(payload['error'])[:300]}"
                    return
                if payload.get("usage"):
                    result.usage_tokens = payload["usage"].get("completion_tokens")
                if _chunk_text(payload):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - result.start
                    else:
                        result.gaps.append(now - last)
                    last = now
                    result.chunks += 1
        if result.output_tokens == 0:
            result.error = "stream ended without any output text"
            return
        result.e2e = time.perf_counter() - result.start
    except asyncio.CancelledError:
        result.cancelled = True
        raise
    except Exception as exc:  # noqa: BLE001 - any server's odd reply is a counted error, not a crash
        result.error = f"{type(exc).__name__}: {exc}"[:300]


async def first_model_id(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


# ---------------------------------------------------------------------------------- the run

async def run_load(spec: LoadSpec) -> LoadReport:
    """Run `spec` against its server; never raises for failed requests (they are counted)."""
    check_loopback(spec.base_url)
    # NOTE: trust_env=False so an HTTP(S)_PROXY in the environment cannot reroute loopback
    # traffic; no connection cap beyond the load itself (Poisson may have many in flight).
    timeout = httpx.Timeout(spec.request_timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=spec.root_url, timeout=timeout, limits=limits,
                                 trust_env=False) as client:
        model = spec.model or await first_model_id(client)
        path = ENDPOINTS[spec.endpoint]
        bodies = [request_body(spec, model, p) for p in make_prompts(spec.requests, spec.seed)]
        # Warm-up requests use prompts after the measured ones' (same list, so same lengths).
        for i, prompt in enumerate(make_prompts(spec.warmup, spec.seed + 1)):
            await stream_one(client, path, request_body(spec, model, prompt), RequestResult(-1 - i))

        results: list[RequestResult] = []
        inflight: set[asyncio.Task] = set()
        start = time.perf_counter()
        deadline = start + spec.time_limit_s

        def launch(index: int) -> asyncio.Task:
            result = RequestResult(index)
            results.append(result)
            task = asyncio.ensure_future(stream_one(client, path, bodies[index], result))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            return task

        next_index = iter(range(spec.requests))

        async def closed_worker() -> None:
            for index in next_index:  # the shared iterator hands each index to one worker
                if time.perf_counter() >= deadline:
                    return
                await launch(index)

        async def poisson_launcher() -> None:
            for index, at in enumerate(poisson_arrivals(spec.requests, spec.rate, spec.seed)):
                if start + at >= deadline:
                    break  # later arrivals fall after the time limit
                delay = start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                launch(index)
            while inflight:  # finished launching: the run ends when the last one does
                await asyncio.wait(set(inflight))

        drivers = ([asyncio.ensure_future(closed_worker()) for _ in range(spec.concurrency)]
                   if spec.rate is None else [asyncio.ensure_future(poisson_launcher())])
        await asyncio.wait(drivers, timeout=max(0.0, deadline - time.perf_counter()))
        # Time limit reached (or everything done): cancel what is left; cancelled requests
        # keep the tokens they streamed and are counted as cancelled, not as errors.
        leftovers = [t for t in (*drivers, *inflight) if not t.done()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        elapsed = min(time.perf_counter(), deadline) - start
        for driver in drivers:  # a bug in the driver itself must not pass silently
            if not driver.cancelled() and driver.exception() is not None:
                raise driver.exception()
    results.sort(key=lambda r: r.index)
    return LoadReport(spec, results, elapsed)


def run_load_sync(spec: LoadSpec) -> dict[str, Any]:
    return asyncio.run(run_load(spec)).as_dict()


# ---------------------------------------------------------------------------------- CLI

def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `run` and `compare`."""
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=60.0, metavar="S",
                        help="stop each load after S seconds (in-flight requests cancelled)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests first")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="load one running server")
    run.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=1, help="closed loop clients")
    mode.add_argument("--rate", type=float, help="Poisson arrivals, requests/s (open loop)")
    run.add_argument("--requests", type=int, default=32)
    run.add_argument("--model", help="default: the first id of /v1/models")
    run.add_argument("--extra", default="{}", metavar="JSON",
                     help='merged into every body, e.g. \'{"ignore_eos": true}\'')
    run.add_argument("--label", default="")
    run.add_argument("--json", action="store_true", help="print the report dict too")
    add_load_arguments(run)
    sub.add_parser("compare", add_help=False,
                   help="ours against peer servers (see `compare --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        # Imported here: the driver (process management, peers) is a module of its own.
        from sparse_serve.bench.serve_peers import main as compare_main
        return compare_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = LoadSpec(base_url=args.url, requests=args.requests,
                        concurrency=None if args.rate else args.concurrency, rate=args.rate,
                        time_limit_s=args.time_limit, max_tokens=args.max_tokens,
                        endpoint=args.endpoint, model=args.model, seed=args.seed,
                        extra_body=json.loads(args.extra), warmup=args.warmup, label=args.label)
    except ValueError as exc:  # a refused host or an impossible load: no traceback
        parser.error(str(exc))
    report = run_load_sync(spec)
    print(markdown_header())
    print(markdown_row(report))
    if report["first_error"]:
        print(f"\nfirst error: {report['first_error']}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
