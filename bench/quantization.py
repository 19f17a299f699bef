"""Quantized weights (`--quantization int8`, `w8a8`, `int4`, `w4a8`) against fp32 on one model: quality
and decode speed.

For the dense model and for the served configuration (configs/smollm2.yaml: the calibrated
sparsity sidecar) when the default model is used:
- perplexity on the held-out split of the calibration text (engine/calibration), fp32 vs each;
- greedy agreement through the offline engine: 5 chat prompts x 32 tokens, each against fp32
  (identical sequences, mean matched prefix before the first different token, and positions
  equal);
and, in the served configuration, decode ms per step at batch 1 and 16 through the offline
engine (decode-only steps as the engine times them), the fp32 and quantized engines stepped in
turn (one step each) so that load from other processes hits all alike; medians over all steps of
all rounds (the machine may be shared: the load average is reported with the table).

    .venv/bin/python -P bench/quantization.py --out docs/benchmarks/quantization.md
    .venv/bin/python -P bench/quantization.py --quick          # smoke run, prints the report
    .venv/bin/python -P bench/quantization.py --kernels        # the kernel alone vs fp32 F.linear

NOTE: run it with -P (as bench/sparsity_quality.py): from the repository root, bench's siblings
would shadow installed packages.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparse_serve.bench.throughput import machine
from sparse_serve.engine.calibration.calibration_data import load_windows
from sparse_serve.engine.calibration.perplexity import evaluate
from sparse_serve.engine.checkpoints.loader import load_model
from sparse_serve.engine.core.config import CONFIG_DIR, EngineConfig
from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.models.quantized import QUANTIZATION_METHODS
from sparse_serve.engine.text.tokenizer import Tokenizer

logger = logging.getLogger("sparse_serve.bench.quantization")

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain, step by step and in plain words, how a refrigerator keeps food cold.",
    "List three facts about the Moon.",
    "What is the capital of France, and why is it famous?",
    "Describe the water cycle to a ten year old.",
]
VARIANTS = (None, *QUANTIZATION_METHODS)   # None: fp32
NOTES_HEADING = "## Notes"


@dataclass
class Setting:
    name: str                         # "dense" | "served"
    yaml: Path | None                 # extra config file (the served sidecar), or None
    ppl: dict = field(default_factory=dict)          # variant -> perplexity
    tokens: dict = field(default_factory=dict)       # variant -> [[ids]] per prompt
    step_ms: dict = field(default_factory=dict)      # (variant, batch) -> [ms per decode step]


def engine_config(model: str, setting: Setting, quantization: str | None, max_num_seqs: int) -> EngineConfig:
    overrides = {"model.path": model, "model.dtype": "float32", "model.device": "cpu",
                 "model.quantization": quantization, "scheduler.max_num_seqs": max_num_seqs,
                 "cache.enable_prefix_caching": False, "cache.kv_cache_bytes": 256 << 20}
    config = EngineConfig.load(*([setting.yaml] if setting.yaml else []), overrides=overrides)
    if quantization is None:
        config.model.quantization = None   # None overrides are skipped: make fp32 explicit
    return config


def measure_perplexity(model: str, setting: Setting, windows, variants: tuple) -> None:
    for variant in variants:
        config = engine_config(model, setting, variant, 1)
        net, _ = load_model(config.model, model)
        result = evaluate(net, windows)
        setting.ppl[variant] = result.perplexity
        logger.info("%s %s: perplexity %.4f on %d tokens", setting.name, variant or "fp32", result.perplexity,
                    result.num_tokens)
        del net


def chat_prompts(llm: LLM) -> list[list[int]]:
    """PROMPTS as one-message user turns, rendered as the server renders a chat request."""
    tokenizer = llm.engine.tokenizer
    if not tokenizer.has_chat_template:
        return [tokenizer.encode(p) for p in PROMPTS]
    return [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]


def lockstep_decode_ms(llms: dict, prompts: list[str], output_len: int) -> dict:
    """Serve the same prompts on every engine, stepping the engines in turn (one step each), so
    a burst of load from other processes hits fp32 and int8 alike. Returns, per variant, the ms
    of every decode-only step that ran all the prompts' sequences (one token each)."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    for v, llm in llms.items():
        for i, prompt in enumerate(prompts):
            request_id = f"bench-q-{v}-{time.monotonic_ns()}-{i}"
            [request] = llm.processor.completion_requests([prompt], params, [request_id])
            llm.engine.add_request(request)
    steps = {v: [] for v in llms}
    while any(llm.engine.has_unfinished() for llm in llms.values()):
        for v, llm in llms.items():
            if not llm.engine.has_unfinished():
                continue
            stats = llm.engine.step().stats
            if stats is not None and stats.phase == "decode" and stats.num_generated_tokens == len(prompts):
                steps[v].append(stats.duration_s * 1e3)
    return steps


def measure_engine(model: str, setting: Setting, args) -> None:
    params = SamplingParams(max_tokens=args.agree_tokens, temperature=0.0, ignore_eos=True)
    llms = {v: LLM(model, config=engine_config(model, setting, v, args.concurrency)) for v in args.variants}
    for v, llm in llms.items():
        setting.tokens[v] = [r.completions[0].token_ids for r in llm.generate(chat_prompts(llm), params)]
    if not args.speed or setting.name != "served":
        return
    batch_prompts = {b: [f"{PROMPTS[i % len(PROMPTS)]} (request {i})" for i in range(b)] for b in (1, args.concurrency)}
    lockstep_decode_ms(llms, batch_prompts[1], 4)           # warm-up
    for round_index in range(args.rounds):
        for batch, prompts in batch_prompts.items():
            for v, steps in lockstep_decode_ms(llms, prompts, args.output_len).items():
                setting.step_ms.setdefault((v, batch), []).extend(steps)
                logger.info("round %d batch %d %s: median %.2f ms/step over %d steps", round_index + 1, batch,
                            v or "fp32", statistics.median(steps), len(steps))


def agreement(ref: list[list[int]], other: list[list[int]]) -> tuple[int, float, float]:
    """(identical sequences, mean matched-prefix fraction, fraction of positions equal)."""
    identical, prefix, equal, total = 0, 0.0, 0, 0
    for a, b in zip(ref, other):
        identical += a == b
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        prefix += first / len(a)
        equal += sum(x == y for x, y in zip(a, b))
        total += len(a)
    return identical, prefix / len(ref), equal / total


# (name, N, K, batches): SmolLM2-135M's fused q/k/v, o_proj (with a prefill-sized batch) and
# lm_head, and one Mistral-7B projection
KERNEL_SHAPES = [("qkv 135M", 960, 576, (1, 16, 64, 512)), ("o_proj 135M", 576, 576, (1, 16, 64, 512)),
                 ("lm_head 135M", 49152, 576, (1, 16, 64)), ("q_proj 7B", 4096, 4096, (1, 16, 64))]


def kernel_table(calls: int = 40) -> list[str]:
    """fp32 F.linear vs the int8 kernel per shape and batch: (min, median) ms over `calls` calls.
    NOTE: each weight is called repeatedly, so the small ones are cache resident here (they come
    from memory in a real step, where the model's weights do not fit the caches)."""
    import torch.nn.functional as F

    from sparse_serve.kernels.linear_int8_cpu import linear_int8_native, quantize_int8

    def timed(fn) -> tuple[float, float]:
        fn()
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
        return min(times), statistics.median(times)

    lines = [f"Kernel alone: ms per call, min / median of {calls} calls, {torch.get_num_threads()} thread(s).", "",
             "| weight [N, K] | M | fp32 F.linear | int8 kernel | min ratio |", "|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(0)
    for name, n, k, batches in KERNEL_SHAPES:
        w = torch.randn(n, k, generator=gen) / k ** 0.5
        w_q, scale = quantize_int8(w)
        for m in batches:
            x = torch.randn(m, k, generator=gen)
            ref, q = timed(lambda: F.linear(x, w)), timed(lambda: linear_int8_native(x, w_q, scale))
            lines.append(f"| {name} [{n}, {k}] | {m} | {ref[0]:.3f} / {ref[1]:.3f} | {q[0]:.3f} / {q[1]:.3f} | "
                         f"{ref[0] / q[0]:.2f}x |")
            logger.info(lines[-1])
    return lines


def report(settings: list[Setting], args, info: dict) -> str:
    quantized = args.variants[1:]
    lines = ["# Quantized weights (`--quantization " + " / ".join(quantized) + "`) vs fp32", "",
             f"{datetime.date.today().isoformat()}, {machine()}; model `{info['model']}`.",
             f"Command: `{info['command']}`", "",
             "What is int8: attention's fused q/k/v projection, o_proj and lm_head (a tied head gets its own "
             "int8 copy; the embedding lookups stay fp32) with per-output-row symmetric scales "
             "(kernels/csrc/linear_int8_cpu.cpp), each FFN's gate and up rows (a scale per neuron) "
             "and down rows (a scale per hidden channel) read by the sparse FFN kernel "
             "(kernels/csrc/sparse_ffn_cpu.cpp), and the predictors' fc1/fc2 (a scale per row) "
             "(engine/models/quantized.py). The inputs of q/k/v, o_proj, lm_head and the FFN's gate and up "
             "products are put on a per-row grid (kernels/activation_grid.py): 14 bits for `int8`, 8 bits "
             "for `w8a8` (but lm_head's, 14 bits under both); the products are exact integer sums, "
             "accumulated in int32 and scaled in fp32. "
             "`int4` and `w4a8` are `int8` and `w8a8` with 4-bit rows (kernels/int4_rows.py: groups of 32 "
             "weights, an integer multiplier per group, 4.25 bits a weight, each row holding int8 values) "
             "for q/k/v, o_proj and the FFN's gate, up and down (down scaled per neuron there); lm_head "
             "and the predictors stay int8. "
             "Decode-only steps run all layers in one native call (kernels/csrc/decode_layers_cpu.cpp).", "",
             "## Quality", "",
             f"Perplexity: held-out split of the calibration text, {args.windows} windows of {args.window} "
             f"tokens. Greedy: {len(PROMPTS)} chat prompts (one user turn each, the model's chat template) x "
             f"{args.agree_tokens} tokens through the offline engine, each variant against fp32: sequences "
             "identical, the mean fraction of each fp32 sequence reproduced before the first different "
             "token, and the positions equal.", "",
             "| setting | variant | ppl fp32 | ppl variant | delta | identical sequences | matched prefix | "
             "positions equal |", "|---|---|---|---|---|---|---|---|"]
    for s in settings:
        for v in quantized:
            identical, prefix, equal = agreement(s.tokens[None], s.tokens[v])
            delta = (s.ppl[v] / s.ppl[None] - 1) * 100
            lines.append(f"| {s.name} | {v} | {s.ppl[None]:.3f} | {s.ppl[v]:.3f} | {delta:+.2f}% | "
                         f"{identical}/{len(PROMPTS)} | {prefix:.0%} | {equal:.0%} |")
    if len(settings) == 2:
        identical, prefix, equal = agreement(settings[0].tokens[None], settings[1].tokens[None])
        lines += ["", f"For scale, the calibrated sparsity alone (served fp32 against dense fp32) keeps "
                      f"{identical}/{len(PROMPTS)} sequences identical, a {prefix:.0%} matched prefix and "
                      f"{equal:.0%} of positions."]
    served = next((s for s in settings if s.step_ms), None)
    if served is not None:
        header = " | ".join(f"{v} ms/step | speed-up" for v in quantized)
        lines += ["", "## Decode speed", "",
                  f"Offline engine, `{served.name}` setting, {args.output_len} output tokens per request, "
                  f"{args.rounds} rounds, the engines stepped in turn; {torch.get_num_threads()} torch "
                  "thread(s); median ms of a decode-only step "
                  "(one token for every running sequence) over all steps of all rounds, and the interquartile range. "
                  f"Load average before {info['load_before']}, after {info['load_after']} "
                  f"({os.cpu_count()} cores).", "",
                  f"| batch | fp32 ms/step | {header} | tok/s fp32 / " + " / ".join(quantized) + " |",
                  "|---|---|" + "---|---|" * len(quantized) + "---|"]
        for batch in sorted({b for _, b in served.step_ms}):
            ref = served.step_ms[(None, batch)]
            m_ref = statistics.median(ref)
            cells, rates = [], [f"{batch * 1e3 / m_ref:.1f}"]
            for v in quantized:
                q = served.step_ms[(v, batch)]
                m_q = statistics.median(q)
                cells.append(f"{m_q:.2f} ({_iqr(q)}) | {m_ref / m_q:.2f}x")
                rates.append(f"{batch * 1e3 / m_q:.1f}")
            lines.append(f"| {batch} | {m_ref:.2f} ({_iqr(ref)}) | " + " | ".join(cells) + f" | {' / '.join(rates)} |")
    return "\n".join(lines) + "\n"


def _iqr(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.2f}-{q[2]:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the embedded default model)")
    parser.add_argument("--out", type=Path, help="write the markdown report here (default: print it)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--windows", type=int, default=8, help="held-out windows for perplexity")
    parser.add_argument("--agree-tokens", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64, help="tokens per request in the speed runs")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--kernels", action="store_true", help="only the kernel-alone table, printed")
    parser.add_argument("--no-speed", dest="speed", action="store_false", help="quality only")
    parser.add_argument("--quick", action="store_true", help="2 windows, 1 round, 16 tokens: a smoke run")
    parser.add_argument("--methods", nargs="+", choices=QUANTIZATION_METHODS, default=list(QUANTIZATION_METHODS),
                        help="the quantizations to compare with fp32 (default: all)")
    args = parser.parse_args(argv)
    args.variants = (None, *args.methods)
    if args.quick:
        args.windows, args.rounds, args.output_len, args.agree_tokens = 2, 1, 16, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.kernels:
        print(f"{datetime.date.today().isoformat()}, {machine()}, load average {os.getloadavg()}\n")
        print("\n".join(kernel_table()))
        return 0
    model = args.model
    settings = [Setting("dense", None)]
    if model is None:
        from sparse_serve.engine.checkpoints.default_model import default_model_path

        model = str(default_model_path())
        settings.append(Setting("served", CONFIG_DIR / "smollm2.yaml"))
    else:
        settings[0].name = "served"   # a user's folder: measured as given, speed included
    command = "python -P bench/quantization.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    info = {"model": model, "command": command, "load_before": tuple(round(x, 2) for x in os.getloadavg())}
    windows = load_windows(Tokenizer.from_pretrained(model), "heldout", args.window, args.windows)
    for setting in settings:
        measure_perplexity(model, setting, windows, args.variants)
        measure_engine(model, setting, args)
    info["load_after"] = tuple(round(x, 2) for x in os.getloadavg())
    text = report(settings, args, info)
    if args.out:
        # NOTE: the hand-written notes at the end of an existing report survive a rerun.
        previous = args.out.read_text() if args.out.is_file() else ""
        if NOTES_HEADING in previous:
            text += "\n" + previous[previous.index(NOTES_HEADING):]
        args.out.write_text(text)
        logger.info("wrote %s", args.out)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
