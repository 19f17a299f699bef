"""`python -P bench/serve.py compare`: ours against peer servers, one after the other, same load.

For each server in turn: start it on 127.0.0.1 at a free port (its log goes to a temporary
file), wait until /health (where it exists) and /v1/models answer, run the same loads (closed loop at 1 and 16
clients by default, 64 output tokens per request, greedy, the same seeded prompts), stop it
(SIGTERM, then SIGKILL), and finally print one markdown table with each peer's ratios to ours.
Only one server runs at a time, so none competes with another for the 2 cores.

Servers, all on the same model (the embedded SmolLM2-135M-Instruct):

- ours: `python -P -m sparse_serve.server serve` with no --model (the converted default model
  and configs/smollm2.yaml), equal lengths through `ignore_eos: true`;
- transformers fp32 / bf16: `transformers serve --continuous-batching` from the same
  environment on the converted folder (`default_model_path()`); equal lengths through its
  per-request `generation_config` JSON with `eos_token_id: -1`, which its continuous-batching
  manager treats as "no EOS" (`min_new_tokens` would not reach that manager);
- llama.cpp: `python -m llama_cpp.server` (llama-cpp-python[server]) on the original GGUF with
  `--interrupt_requests False` (a new request must not abort the running one) and all cores;
  equal lengths through its `min_tokens`. It is not a dependency of this project: install it in
  a separate environment and pass its interpreter with --llama-python (docs/benchmarks/serving.md).

A peer whose program is missing, or that fails to start, is skipped with the reason; the run
goes on with the others.

    python -P bench/serve.py compare                           # all, defaults
    python -P bench/serve.py compare --servers ours transformers-fp32 --requests 24
    python -P bench/serve.py compare --llama-python ~/.venvs/llama/bin/python
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sparse_serve.bench.serve import (
    ALLOWED_HOST,
    LoadSpec,
    add_load_arguments,
    markdown_header,
    markdown_row,
    run_load_sync,
)

LEVELS = (1, 16)
DEFAULT_SERVERS = ("ours", "ours-int8", "ours-w8a8", "transformers-fp32", "transformers-bf16", "llama.cpp")
STARTUP_TIMEOUT_S = 600.0  # ours converts the GGUF on first use; later starts take seconds
LLAMA_INSTALL = ("python -m venv ~/.venvs/llama && ~/.venvs/llama/bin/pip install "
                 "'llama-cpp-python[server]'")


class Skip(Exception):
    """This server cannot run here; the message says why and what to do."""


@dataclass
class Server:
    name: str
    command: Callable[[int], list[str]]            # port -> argv; may raise Skip
    extra_body: dict[str, Any]                     # what forces equal output lengths
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((ALLOWED_HOST, 0))
        return sock.getsockname()[1]


def model_folder() -> str:
    from sparse_serve.engine.checkpoints.default_model import default_model_path
    return default_model_path()


def _ours(*flags: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [sys.executable, "-P", "-m", "sparse_serve.server", "serve", "--host", ALLOWED_HOST,
                "--port", str(port), *flags]
    return command


def _transformers(dtype: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        # The `transformers` console script of this same environment (.venv/bin).
        script = Path(sys.executable).with_name("transformers")
        if not script.exists():
            raise Skip(f"no {script}: transformers' CLI is not installed in this environment")
        for module in ("fastapi", "uvicorn"):  # what `transformers serve` needs on top
            if _probe(sys.executable, module):
                raise Skip(f"`transformers serve` needs {module}: pip install 'transformers[serving]'")
        return [str(script), "serve", model_folder(), "--continuous-batching", "--device", "cpu",
                "--dtype", dtype, "--host", ALLOWED_HOST, "--port", str(port),
                "--log-level", "warning"]
    return command


def _llama(python: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        error = _probe(python, "llama_cpp.server.app")
        if error:
            raise Skip(f"llama-cpp-python[server] is not importable by {python} ({error}); "
                       f"install it apart from this project: `{LLAMA_INSTALL}`, then pass "
                       "--llama-python ~/.venvs/llama/bin/python")
        from sparse_serve.engine.checkpoints.default_model import find_default_gguf
        threads = str(os.cpu_count() or 1)  # its default is half the cores
        return [python, "-m", "llama_cpp.server", "--model", str(find_default_gguf()),
                "--host", ALLOWED_HOST, "--port", str(port), "--interrupt_requests", "False",
                "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "2048"]
    return command


def _probe(python: str, module: str) -> str | None:
    """None if `python` can import `module`, else the error's last line."""
    probe = subprocess.run([python, "-P", "-c", f"import {module}"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {probe.returncode}"


def servers(max_tokens: int, llama_python: str) -> dict[str, Server]:
    offline = {"HF_HUB_OFFLINE": "1"}  # local folders only; this machine reaches no model hub
    no_eos = {"generation_config": json.dumps({"eos_token_id": -1})}
    return {
        # fp32: what `serve` picks on a CPU (dtype auto).
        "ours": Server("ours", _ours(), {"ignore_eos": True}),
        "transformers-fp32": Server("transformers-fp32", _transformers("float32"), no_eos, offline),
        "transformers-bf16": Server("transformers-bf16", _transformers("bfloat16"), no_eos, offline),
        "llama.cpp": Server("llama.cpp", _llama(llama_python), {"min_tokens": max_tokens}),
        # int8 weights (attention, head, FFN rows, predictors), 14-bit activation grid: the row to hold against
        # llama.cpp's quantized GGUF.
        "ours-int8": Server("ours-int8", _ours("--quantization", "int8"), {"ignore_eos": True}),
        # int8 weights and 8-bit activations: twice int8's products per instruction, for a
        # perplexity cost measured in docs/benchmarks/quantization.md.
        "ours-w8a8": Server("ours-w8a8", _ours("--quantization", "w8a8"), {"ignore_eos": True}),
        # Opt-in (not in DEFAULT_SERVERS): ours in bf16, for CPUs with bf16 units (avx512_bf16).
        "ours-bf16": Server("ours-bf16", _ours("--dtype", "bfloat16"), {"ignore_eos": True}),
        # Opt-in: 4-bit rows for attention and the FFN (about half of int8's bytes there; on the
        # default model, whose weights are a Q4_1 GGUF's, a second 4-bit rounding costs perplexity:
        # docs/benchmarks/quantization.md).
        "ours-int4": Server("ours-int4", _ours("--quantization", "int4"), {"ignore_eos": True}),
        "ours-w4a8": Server("ours-w4a8", _ours("--quantization", "w4a8"), {"ignore_eos": True}),
    }


# ---------------------------------------------------------------------------------- processes

class Running:
    """One server process, in a session of its own so that stopping it stops its children."""

    def __init__(self, server: Server, port: int) -> None:
        self.server = server
        self.url = f"http://{ALLOWED_HOST}:{port}"
        argv = server.command(port)  # may raise Skip before anything starts
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{server.name}-",
                                               suffix=".log", delete=False)
        print(f"[{server.name}] starting: {' '.join(argv)} (log: {self.log.name})", flush=True)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **server.env}, start_new_session=True)

    def log_tail(self, lines: int = 8) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise Skip(f"exited with code {self.proc.returncode} while starting:\n"
                               f"{self.log_tail()}")
                try:
                    # NOTE: 404: a server without a health route (llama-cpp-python 0.3.x);
                    # its /v1/models answering is the readiness signal there.
                    if (client.get("/health").status_code in (200, 404)
                            and client.get("/v1/models").status_code == 200):
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                time.sleep(1.0)
        raise Skip(f"not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, keep_log: bool) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own child's session, nothing else
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
        if not keep_log:  # kept (its path was printed) only when something went wrong
            os.unlink(self.log.name)


def measure(server: Server, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start `server`, run every level against it, stop it; raises Skip if it cannot start."""
    running = Running(server, free_port())
    failed = True
    try:
        started = time.monotonic()
        running.wait_healthy(args.startup_timeout)
        print(f"[{server.name}] healthy after {time.monotonic() - started:.0f} s", flush=True)
        reports = []
        for level in args.levels:
            spec = LoadSpec(base_url=running.url, requests=args.requests, concurrency=level,
                            time_limit_s=args.time_limit, max_tokens=args.max_tokens,
                            endpoint=args.endpoint, seed=args.seed, warmup=args.warmup,
                            extra_body=server.extra_body, label=server.name)
            report = run_load_sync(spec)
            print(markdown_row(report), flush=True)
            if report["first_error"]:
                print(f"[{server.name}] first error: {report['first_error']}", flush=True)
            reports.append(report)
        failed = any(r["errors"] for r in reports)
        return reports
    finally:
        running.stop(keep_log=failed)


# ---------------------------------------------------------------------------------- table

def _ratio(value: float | None, base: float | None) -> str:
    return "-" if not value or not base else f"{value / base:.2f}x"


def comparison_table(reports: list[dict[str, Any]], baseline: str = "ours") -> str:
    """All rows, grouped by load, with the peer / ours ratios of tok/s and latency medians."""
    ours = {r["mode"]: r for r in reports if r["label"] == baseline}
    header = markdown_header().splitlines()
    lines = [header[0] + " tok/s vs ours | TTFT p50 vs ours | ITL p50 vs ours | equal lengths |",
             header[1] + "---|---|---|---|"]
    for mode in dict.fromkeys(r["mode"] for r in reports):
        for report in (r for r in reports if r["mode"] == mode):
            base = ours.get(mode, {})
            lines.append(markdown_row(report) + " " + " | ".join([
                _ratio(report["output_tok_s"], base.get("output_tok_s")),
                _ratio(report["ttft_p50_ms"], base.get("ttft_p50_ms")),
                _ratio(report["itl_p50_ms"], base.get("itl_p50_ms")),
                "yes" if report["length_mismatches"] == 0 else
                f"no ({report['length_mismatches']} differ)"]) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/serve.py compare",
                                     description="ours against peer servers, one at a time")
    parser.add_argument("--servers", nargs="+", default=list(DEFAULT_SERVERS), metavar="NAME",
                        help=f"which and in what order (default: {' '.join(DEFAULT_SERVERS)}; "
                             "also ours-bf16, ours-int4, ours-w4a8); ratios are to `ours`")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS),
                        metavar="N", help="closed-loop client counts (default: 1 16)")
    parser.add_argument("--requests", type=int, default=32, help="at most, per level")
    parser.add_argument("--llama-python", default=sys.executable, metavar="PYTHON",
                        help="an interpreter with llama-cpp-python[server] (default: this one)")
    parser.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT_S, metavar="S")
    parser.add_argument("--json", metavar="FILE", help="also write every report dict here")
    add_load_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    table = servers(args.max_tokens, args.llama_python)
    unknown = [name for name in args.servers if name not in table]
    if unknown:
        raise SystemExit(f"unknown servers {unknown}; choose from {list(table)}")
    began = datetime.datetime.now(datetime.timezone.utc)
    reports: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for name in args.servers:
        try:
            reports.extend(measure(table[name], args))
        except Skip as reason:
            skipped[name] = str(reason)
            print(f"[{name}] skipped: {reason}", flush=True)
    ended = datetime.datetime.now(datetime.timezone.utc)
    print(f"\n{began:%Y-%m-%d %H:%M}-{ended:%H:%M} UTC; {args.max_tokens} output tokens per "
          f"request, closed loop at {args.levels} clients, at most {args.requests} requests "
          f"and {args.time_limit:g} s per level, {args.endpoint} endpoint, seed {args.seed}\n")
    print(comparison_table(reports))
    for name, reason in skipped.items():
        print(f"\n- {name}: skipped: {reason.splitlines()[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"reports": reports, "skipped": skipped}, indent=2))
    return 0 if reports and all(r["errors"] == 0 for r in reports) else 1
