"""Structured outputs: what a JSON schema costs in serving throughput, and grammar compile time.

    python -P bench/structured.py throughput [--levels 1 16] [--requests 32] [--max-tokens 64]
    python -P bench/structured.py compile
    python -P bench/structured.py step [--rows 1 16]

`throughput` starts our server on the embedded default model (as bench/serve.py compare does)
and runs the same closed-loop load twice per level: free text, and constrained by a JSON
schema. Both produce exactly --max-tokens tokens per request, so tok/s compare like for like:
the free run through `ignore_eos`, the constrained one through a schema whose one string field
needs more characters than the budget holds (the grammar cannot finish early, and EOS is
masked until it does). The ratio is the price of the bitmask (fill on the CPU, apply to the
logits) per step.

`compile` loads the default model's tokenizer and times, in this process: the one-time
tokenizer scan (first use of the compiler), a cold compile of a typical schema (an object with
nested objects, an array, an enum, bounded numbers and optional fields; median of several, each
with a distinct title so none hits the cache) and a cached one (the engine's hash lookup).

`step` times the model runner's hook alone (engine/structured/bitmask.py: sync each matcher,
fill the bitmask, apply it to [rows, vocab] float32 logits on the CPU) over a few hundred
decode steps of greedy tokens, which is what a constrained batch adds to every step; unlike
`throughput` it is not at the mercy of other jobs on the machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from sparse_serve.bench.serve import LoadSpec, add_load_arguments, markdown_header, markdown_row, run_load_sync
from sparse_serve.bench.serve_peers import Running, Skip, free_port, servers

# One string field far longer than any --max-tokens: every constrained request runs to the budget.
LONG_ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 100000}},
                      "required": ["answer"]}
TYPICAL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 64},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"anyOf": [{"type": "string", "format": "email"}, {"type": "null"}]},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "country": {"type": "string", "enum": ["FR", "DE", "IT", "ES", "UK", "US"]}},
            "required": ["street", "city", "country"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "email", "address", "tags", "score"],
    "additionalProperties": False,
}


def schema_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}


def throughput(args: argparse.Namespace) -> int:
    ours = servers(args.max_tokens, sys.executable)["ours"]
    try:
        running = Running(ours, free_port())
    except Skip as reason:
        print(f"cannot start ours: {reason}")
        return 1
    failed = True
    rows = []
    try:
        running.wait_healthy(600.0)
        for level in args.levels:
            pair = []
            for label, extra in (("free", {"ignore_eos": True}), ("json_schema", schema_body(LONG_ANSWER_SCHEMA))):
                spec = LoadSpec(base_url=running.url, requests=args.requests, concurrency=level,
                                time_limit_s=args.time_limit, max_tokens=args.max_tokens,
                                endpoint="chat", seed=args.seed, warmup=args.warmup,
                                extra_body=extra, label=label)
                report = run_load_sync(spec)
                print(markdown_row(report), flush=True)
                pair.append(report)
            rows.append(pair)
        failed = any(r["errors"] for pair in rows for r in pair)
    finally:
        running.stop(keep_log=failed)
    print("\n" + markdown_header())
    for free, constrained in rows:
        print(markdown_row(free))
        print(markdown_row(constrained))
    print("\n| clients | free tok/s | json_schema tok/s | schema / free | equal lengths |\n|---|---|---|---|---|")
    for free, constrained in rows:
        ratio = constrained["output_tok_s"] / free["output_tok_s"] if free["output_tok_s"] else float("nan")
        equal = free["length_mismatches"] == 0 and constrained["length_mismatches"] == 0
        print(f"| {free['mode']} | {free['output_tok_s']:.1f} | {constrained['output_tok_s']:.1f} | "
              f"{ratio:.3f} | {'yes' if equal else 'no'} |")
    return 1 if failed else 0


def compile_times(args: argparse.Namespace) -> int:
    from sparse_serve.engine.checkpoints.default_model import default_model_path
    from sparse_serve.engine.structured.compiler import GrammarCompiler
    from sparse_serve.engine.structured.params import StructuredOutputs
    from sparse_serve.engine.text.tokenizer import Tokenizer, load_eos_token_ids

    path = default_model_path()
    tokenizer = Tokenizer.from_pretrained(path)
    compiler = GrammarCompiler(tokenizer.hf, load_eos_token_ids(path, tokenizer))
    started = time.perf_counter()
    compiler.compile_now(StructuredOutputs("regex", "warm-up", "bench"))
    first_use = time.perf_counter() - started

    def spec(i: int) -> StructuredOutputs:
        return StructuredOutputs.json_schema({**TYPICAL_SCHEMA, "title": f"run {i}"}, "bench")

    cold = [compiler.compile_now(spec(i)).seconds for i in range(args.repeats)]
    cached = []
    for _ in range(args.repeats * 20):
        started = time.perf_counter()
        assert compiler.compile_now(spec(0)).cached
        cached.append(time.perf_counter() - started)
    print(f"tokenizer vocab {tokenizer.vocab_size}; schema {len(json.dumps(TYPICAL_SCHEMA))} chars\n")
    print("| what | time |\n|---|---|")
    print(f"| first use (tokenizer scan + a tiny regex) | {first_use * 1e3:.0f} ms |")
    print(f"| typical schema, cold (median of {args.repeats}) | {statistics.median(cold) * 1e3:.1f} ms |")
    print(f"| typical schema, cached (median of {len(cached)}) | {statistics.median(cached) * 1e6:.0f} us |")
    return 0


def step_times(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    import torch

    from sparse_serve.engine.checkpoints.default_model import default_model_path
    from sparse_serve.engine.structured.bitmask import apply_grammar_bitmasks
    from sparse_serve.engine.structured.compiler import GrammarCompiler
    from sparse_serve.engine.structured.params import StructuredOutputs
    from sparse_serve.engine.text.tokenizer import Tokenizer, load_eos_token_ids

    path = default_model_path()
    tokenizer = Tokenizer.from_pretrained(path)
    compiler = GrammarCompiler(tokenizer.hf, load_eos_token_ids(path, tokenizer))
    generator = torch.Generator().manual_seed(0)
    print("| schema | rows | hook per step, median | p90 |\n|---|---|---|---|")
    for name, schema in (("typical", TYPICAL_SCHEMA), ("long answer", LONG_ANSWER_SCHEMA)):
        grammar = compiler.compile_now(StructuredOutputs.json_schema(schema, "bench")).grammar
        for rows in args.rows:
            seqs = [SimpleNamespace(params=SimpleNamespace(grammar=grammar), output_token_ids=[],
                                    grammar_state=None) for _ in range(rows)]
            times = []
            for _ in range(args.steps):
                logits = torch.randn(rows, tokenizer.vocab_size, generator=generator)    # [S, V]
                started = time.perf_counter()
                apply_grammar_bitmasks(logits, seqs)
                times.append(time.perf_counter() - started)
                for row, seq in enumerate(seqs):
                    token = int(logits[row].argmax())
                    # a finished grammar: start that row over (keeps every row busy)
                    seq.output_token_ids = [] if token in grammar.stop_token_ids else seq.output_token_ids + [token]
                    if not seq.output_token_ids:
                        seq.grammar_state = None
            times.sort()
            print(f"| {name} | {rows} | {statistics.median(times) * 1e3:.2f} ms | "
                  f"{times[int(len(times) * 0.9)] * 1e3:.2f} ms |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("throughput", help="free vs JSON-schema load on our server")
    run.add_argument("--levels", type=int, nargs="+", default=[1, 16], metavar="N")
    run.add_argument("--requests", type=int, default=32, help="at most, per level and kind")
    add_load_arguments(run)
    comp = sub.add_parser("compile", help="grammar compile time, cold and cached")
    comp.add_argument("--repeats", type=int, default=5)
    step = sub.add_parser("step", help="the per-step bitmask hook alone")
    step.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    step.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    commands = {"throughput": throughput, "compile": compile_times, "step": step_times}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
