"""What trained predictors buy on a thresholded SwiGLU model: held-out perplexity, FFN sparsity,
the share of gate rows still read, and batch-1 decode speed, against the same model with its
calibrated thresholds alone (every gate row read, then up/down for the active neurons).

    python -P -m sparse_serve.engine.predictors.measure --model /tmp/smollm2-pred \\
        --sparsity configs/smollm2-sparsity.json --thresholds 0 -2

Weights read per token (FFN, as a fraction of the dense FFN): thresholds alone read all of gate
and the active share of up and down, (1 + 2a) / 3; with predictors, gate, up and down only for
predicted neurons plus the predictor itself, (3p + r (H + I) / (H I)) / 3.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from sparse_serve.engine.calibration.calibration_data import load_windows
from sparse_serve.engine.calibration.perplexity import evaluate
from sparse_serve.engine.core.config import EngineConfig, ModelConfig

logger = logging.getLogger(__name__)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Activation sparsity means",
           "Once upon a time"]


def predicted_share(model, windows) -> float:
    """Mean fraction of neurons the predictors select (the gate/up/down rows a step reads)."""
    counts: list[float] = []

    def hook(_module, _args, output):
        counts.append(float(output.float().mean()))

    hooks = [m.predictor.register_forward_hook(hook) for m in model.mlps if m.predictor is not None]
    try:
        evaluate(model, windows)
    finally:
        for h in hooks:
            h.remove()
    return sum(counts) / max(len(counts), 1)


def decode_speed(folder: str, overrides: dict, rounds: int, max_tokens: int) -> float:
    from sparse_serve.engine.core.llm import LLM
    from sparse_serve.engine.core.sampling_params import SamplingParams

    config = EngineConfig.load(overrides={"model.path": folder, "model.device": "cpu", "model.dtype": "float32",
                                          "scheduler.max_num_seqs": 1, "cache.enable_prefix_caching": False,
                                          **overrides})
    llm = LLM(folder, config=config)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPTS[:1], params)   # warm-up
    speeds = []
    for _ in range(rounds):
        start = time.perf_counter()
        results = llm.generate(PROMPTS, params)
        speeds.append(sum(len(r.completions[0].token_ids) for r in results) / (time.perf_counter() - start))
    return statistics.median(speeds)


def main(argv=None) -> int:
    from sparse_serve.engine.checkpoints.loader import load_model
    from sparse_serve.engine.text.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a train-predictors output folder")
    parser.add_argument("--sparsity", required=True, help="the sidecar it was trained with")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0])
    parser.add_argument("--heldout-windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING")
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_pretrained(args.model)
    windows = load_windows(tokenizer, "heldout", args.window, args.heldout_windows)
    rows = []
    variants = [("dense", {"model.use_predictor": False}, None),
                ("thresholds", {"model.use_predictor": False}, args.sparsity)]
    variants += [(f"thresholds + predictors @ {t:g}", {"model.predictor_threshold": t}, args.sparsity)
                 for t in args.thresholds]
    for name, overrides, sparsity in variants:
        cfg = ModelConfig(path=args.model, dtype="float32", device="cpu", sparsity_file=sparsity,
                          use_predictor=overrides.get("model.use_predictor", True),
                          predictor_threshold=overrides.get("model.predictor_threshold", 0.0))
        model, arch = load_model(cfg, args.model)
        result = evaluate(model, windows)
        active = 1.0 - result.sparsity
        uses_predictor = cfg.use_predictor and any(m.predictor is not None for m in model.mlps)
        if uses_predictor:
            share = predicted_share(model, windows)
            rank = max(r for r in arch.predictor_ranks if r)
            h, i = arch.hidden_size, arch.intermediate_size
            ffn_read = (3 * share + rank * (h + i) / (h * i)) / 3
        else:
            share = 1.0
            ffn_read = 1.0 if sparsity is None else (1 + 2 * active) / 3
        speed = decode_speed(args.model, {**overrides, "model.sparsity_file": sparsity}, args.rounds,
                             args.max_tokens)
        rows.append({"variant": name, "perplexity": round(result.perplexity, 3),
                     "ffn_sparsity": round(result.sparsity, 4), "gate_rows_read": round(share, 4),
                     "ffn_weights_read": round(ffn_read, 4), "decode_tok_s": round(speed, 2)})
        print(json.dumps(rows[-1]), flush=True)
    print("| variant | held-out ppl | FFN sparsity | gate rows read | FFN weights read | batch-1 tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['perplexity']:.2f} | {r['ffn_sparsity']:.3f} | {r['gate_rows_read']:.3f} "
              f"| {r['ffn_weights_read']:.3f} | {r['decode_tok_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
