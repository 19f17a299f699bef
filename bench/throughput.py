"""Offline throughput (output tokens/s) of the engine against transformers `generate`.

Runs, in one process and on one model folder (the embedded SmolLM2-135M-Instruct by default):

- ours at batch 1: `scheduler.max_num_seqs = 1`, the requests run one after another;
- ours concurrent: `max_num_seqs = --concurrency` (16 by default), all requests at once;
- transformers `generate` at batch 1, one request after another (and, unless --no-hf-batch,
  one left-padded batch of the concurrent requests, for context);

each for every dtype in --dtypes (fp32 by default; bf16 is optional: torch's bf16 GEMM is slow
on CPUs without bf16 units). Every request has a fixed number of output tokens (ignore_eos /
min_new_tokens), greedy, with the same token-id prompts for every runner, and prefix caching is
off so repeated rounds do not get cheaper prefills. Within a round the batch-1 runners take
turns request by request and the concurrent runs follow; the table reports the median over
rounds, which keeps the comparison usable on a shared machine. `tok/s` is output tokens / wall
time (prefill included); `decode tok/s` counts only the engine's decode-only steps.

    python bench/throughput.py                                  # prints the table
    python bench/throughput.py --out docs/benchmarks/throughput.md
    python bench/throughput.py --dtypes fp32 bf16 --rounds 3
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams

logger = logging.getLogger("sparse_serve.bench.throughput")

NOTES_HEADING = "## Notes"
DTYPES = {"fp32": ("float32", torch.float32), "bf16": ("bfloat16", torch.bfloat16)}
# Prompt stems of different lengths; request i gets stem i % len and a distinct suffix, so the
# batch mixes prompt lengths and no two prompts are identical.
PROMPT_STEMS = [
    "Write a short story about a robot who learns to paint.",
    "Explain, step by step and in plain words, how a refrigerator keeps food cold.",
    "List three facts about the Moon.",
    "You are a helpful assistant. Summarise the plot of a detective novel set in a small "
    "coastal town in winter, where the lighthouse keeper is the main suspect.",
    "What is the capital of France, and why is it famous?",
    "Describe the water cycle to a ten year old.",
]


@dataclass
class Measurement:
    name: str                      # row label
    impl: str                      # "ours" | "transformers"
    dtype: str
    concurrency: int
    num_requests: int
    output_tokens: int = 0
    wall_s: list[float] = field(default_factory=list)           # one per round
    decode_tok_s: list[float] = field(default_factory=list)     # ours only
    variant: str | None = None     # ours: the extra YAML config applied, if any

    @property
    def tok_s(self) -> float:
        return self.output_tokens / statistics.median(self.wall_s)


def make_prompts(tokenizer, num: int) -> list[list[int]]:
    stems = itertools.cycle(PROMPT_STEMS)
    return [tokenizer.encode(f"{next(stems)} (request {i})") for i in range(num)]


# ---- our engine ---------------------------------------------------------------------------
def make_llm(model: str, dtype: str, max_num_seqs: int, kv_bytes: int, yaml: Path | None = None) -> LLM:
    overrides = {"model.path": model, "model.dtype": dtype, "model.device": "cpu",
                 "scheduler.max_num_seqs": max_num_seqs, "cache.enable_prefix_caching": False,
                 "cache.kv_cache_bytes": kv_bytes}
    config = EngineConfig.load(*([yaml] if yaml else []), overrides=overrides)
    return LLM(model, config=config)


_request_ids = itertools.count()


def run_ours(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, int, int, float]:
    """(wall s, output tokens, decode-only tokens, decode-only s) for all prompts through one engine."""
    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    started = time.perf_counter()
    for ids in prompts:
        [request] = llm.processor.completion_requests([list(ids)], params, [f"bench-{next(_request_ids)}"])
        engine.add_request(request)
    num_tokens, decode_tokens, decode_s = 0, 0, 0.0
    while engine.has_unfinished():
        result = engine.step()
        for out in result.outputs:
            num_tokens += sum(len(delta.token_ids) for delta in out.outputs)
        if result.stats is not None and result.stats.phase == "decode":
            decode_tokens += result.stats.num_generated_tokens
            decode_s += result.stats.duration_s
    wall = time.perf_counter() - started
    return wall, num_tokens, decode_tokens, decode_s


# ---- transformers -------------------------------------------------------------------------
def load_hf(model: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    hf.eval()
    return hf


@torch.inference_mode()
def run_hf(hf, prompts: list[list[int]], output_len: int, batch: int, pad_id: int) -> tuple[float, int]:
    """(wall seconds, output tokens); batches are left-padded, EOS is suppressed by min_new_tokens."""
    started, num_tokens = time.perf_counter(), 0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])        # [B, W]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])       # [B, W]
        out = hf.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                          max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=pad_id)
        num_tokens += (out.shape[1] - width) * len(chunk)
    return time.perf_counter() - started, num_tokens


# ---- the run ------------------------------------------------------------------------------
@dataclass
class Runner:
    measurement: Measurement
    prompts: list[list[int]]
    fn: object          # (prompts, output_len) -> (wall s, output tokens, decode tokens, decode s)

    @property
    def sequential(self) -> bool:
        return self.measurement.concurrency == 1


def build_runners(args, model: str) -> list[Runner]:
    kv_bytes = args.kv_cache_mib << 20
    runners: list[Runner] = []
    prompts_b1 = prompts_conc = None
    c = args.concurrency
    for key in args.dtypes:
        dtype_name, torch_dtype = DTYPES[key]
        for yaml in [None, *args.config]:
            b1 = make_llm(model, dtype_name, 1, kv_bytes, yaml)
            conc = make_llm(model, dtype_name, c, kv_bytes, yaml)
            if prompts_b1 is None:
                prompts_b1 = make_prompts(b1.engine.tokenizer, args.batch1_requests)
                prompts_conc = make_prompts(b1.engine.tokenizer, args.concurrent_requests)
                pad_id = min(b1.engine.eos_token_ids)
            tag, variant = (f"ours {key}", None) if yaml is None else (f"ours {key} +{yaml.name}", yaml.name)
            runners.append(Runner(Measurement(f"{tag} batch 1", "ours", key, 1, len(prompts_b1),
                                              variant=variant),
                                  prompts_b1, lambda p, n, llm=b1: run_ours(llm, p, n)))
            runners.append(Runner(Measurement(f"{tag} concurrent {c}", "ours", key, c,
                                              len(prompts_conc), variant=variant),
                                  prompts_conc, lambda p, n, llm=conc: run_ours(llm, p, n)))
        if args.no_hf:
            continue
        hf = load_hf(model, torch_dtype)
        batches = [(1, prompts_b1)] + ([] if args.no_hf_batch else [(c, prompts_conc)])
        for batch, prompts in batches:
            runners.append(Runner(
                Measurement(f"transformers {key} batch {batch}", "transformers", key, batch, len(prompts)),
                prompts, lambda p, n, hf=hf, b=batch, pad=pad_id: (*run_hf(hf, p, n, b, pad), 0, 0.0)))
    return runners


def run(args) -> tuple[list[Measurement], dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        from sparse_serve.engine.checkpoints.default_model import default_model_path
        model = str(default_model_path())
    runners = build_runners(args, model)
    # Warm-up: a few short requests each (native kernel build, rope tables, allocator, BLAS).
    for r in runners:
        r.fn(r.prompts[:2], min(4, args.output_len))
    load_before = os.getloadavg()
    sequential = [r for r in runners if r.sequential]
    for round_index in range(args.rounds):
        totals = {id(r): [0.0, 0, 0, 0.0] for r in runners}
        # NOTE: batch-1 runners alternate request by request (every runner serves request i
        # before any serves request i + 1), so a burst of load from other processes hits them
        # alike; the concurrent runs are short and run one after another.
        for i in range(len(sequential[0].prompts) if sequential else 0):
            for r in sequential:
                for k, v in enumerate(r.fn(r.prompts[i:i + 1], args.output_len)):
                    totals[id(r)][k] += v
        for r in runners:
            if not r.sequential:
                totals[id(r)] = list(r.fn(r.prompts, args.output_len))
        for r in runners:
            m = r.measurement
            wall, tokens, decode_tokens, decode_s = totals[id(r)]
            expected = m.num_requests * args.output_len
            if tokens != expected:
                raise RuntimeError(f"{m.name}: {tokens} output tokens, expected {expected}")
            m.output_tokens = tokens
            m.wall_s.append(wall)
            if decode_s:
                m.decode_tok_s.append(decode_tokens / decode_s)
            logger.info("round %d  %-36s %7.1f tok/s  (%.2f s)", round_index + 1, m.name,
                        tokens / wall, wall)
    info = {"model": model, "load_before": load_before, "load_after": os.getloadavg()}
    return [r.measurement for r in runners], info


# ---- report -------------------------------------------------------------------------------
def _find(rows: list[Measurement], impl: str, dtype: str, concurrent: bool,
          variant: str | None = None) -> Measurement | None:
    for m in rows:
        if (m.impl, m.dtype, m.variant) == (impl, dtype, variant) and (m.concurrency > 1) == concurrent:
            return m
    return None


def target_lines(rows: list[Measurement], concurrency: int) -> list[str]:
    """The issue's two targets, computed from this run's medians, per dtype and variant."""
    lines = []
    hf = {m.dtype: m for m in rows if m.impl == "transformers" and m.concurrency == 1}
    for key, variant in dict.fromkeys((m.dtype, m.variant) for m in rows if m.impl == "ours"):
        ours_b1 = _find(rows, "ours", key, False, variant)
        ours_c = _find(rows, "ours", key, True, variant)
        label = key if variant is None else f"{key} +{variant}"
        ratio = ours_c.tok_s / ours_b1.tok_s
        lines.append(f"{label}: concurrent {concurrency} / batch 1 = {ratio:.2f}x "
                     f"(target >= 4x: {'met' if ratio >= 4 else 'NOT met'})")
        if ours_b1.decode_tok_s and ours_c.decode_tok_s:
            dec = statistics.median(ours_c.decode_tok_s) / statistics.median(ours_b1.decode_tok_s)
            lines.append(f"{label}: decode-only steps, concurrent / batch 1 = {dec:.2f}x")
        if key in hf:
            speed = ours_b1.tok_s / hf[key].tok_s
            lines.append(f"{label}: ours batch 1 / transformers generate batch 1 = {speed:.2f}x "
                         f"(target >= 1x: {'met' if speed >= 1 else 'NOT met'})")
    return lines


def table(rows: list[Measurement]) -> list[str]:
    out = ["| runner | dtype | concurrency | requests | output tokens | tok/s (median) | "
           "tok/s (best) | decode tok/s | rounds (s) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for m in rows:
        best = m.output_tokens / min(m.wall_s)
        decode = f"{statistics.median(m.decode_tok_s):.1f}" if m.decode_tok_s else "-"
        rounds = ", ".join(f"{w:.2f}" for w in m.wall_s)
        out.append(f"| {m.name} | {m.dtype} | {m.concurrency} | {m.num_requests} | {m.output_tokens} | "
                   f"{m.tok_s:.1f} | {best:.1f} | {decode} | {rounds} |")
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def markdown(rows: list[Measurement], info: dict, args, command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in zip(info["load_before"], info["load_after"]))
    lines = [
        "# Offline throughput",
        "",
        f"- Machine: {machine()}",
        f"- Date: {now}",
        f"- Command: `{command}`",
        f"- Model: `{Path(info['model']).name}`; {args.output_len} output tokens per request "
        "(ignore_eos / min_new_tokens), greedy, same token-id prompts for every runner, prefix "
        "caching off.",
        f"- {args.rounds} rounds; batch-1 runners take turns request by request, concurrent runs "
        "follow; tok/s = output tokens / median wall time (prefill included); decode tok/s = "
        "tokens of the engine's decode-only steps / their time.",
        f"- Load average (1, 5, 15 min) before -> after: {load} (a shared machine: compare rows "
        "of this one run only).",
        "",
        *table(rows),
        "",
        "Targets (issue 3):",
        "",
        *[f"- {line}" for line in target_lines(rows, args.concurrency)],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF-style folder (default: embedded SmolLM2)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32"])
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batch1-requests", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--concurrent-requests", type=int, default=None,
                        help="requests in the concurrent runs (default: --concurrency)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--kv-cache-mib", type=int, default=256)
    parser.add_argument("--config", type=Path, nargs="*", default=[],
                        help="extra YAML configs (e.g. configs/smollm2.yaml): each adds its own pair "
                             "of our rows")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--no-hf-batch", action="store_true", help="skip transformers at batch > 1")
    parser.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    args = parser.parse_args(argv)
    if args.concurrent_requests is None:
        args.concurrent_requests = args.concurrency
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # NOTE: the engine logs its KV cache size per instance; keep the benchmark output readable.
    logging.getLogger("sparse_serve.engine").setLevel(logging.WARNING)
    rows, info = run(args)
    command = "python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = markdown(rows, info, args, command.strip())
    logger.info("\n%s", report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: hand-written analysis below NOTES_HEADING survives re-runs of the benchmark.
        old = args.out.read_text() if args.out.is_file() else ""
        if NOTES_HEADING in old:
            report += "\n" + old[old.index(NOTES_HEADING):]
        args.out.write_text(report)
        logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
