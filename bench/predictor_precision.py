"""Lower-precision predictor weights: what int8 or fp8 copies of fc1/fc2 cost in recall.

The predictor reads about as many bytes as a 90%-sparse FFN (issue 17). This takes a trained
predictor folder (`sparse-serve train-predictors`) and scores its per-layer predictor on held-out
tokens against the exact activation, with its weights as stored and with per-row-scaled int8 and
fp8 (e4m3) copies (dequantised to float32 for the scoring, so only the rounding is measured).
The rule from the issue: keep a lower precision only if mean recall stays within 1 point.

    sparse-serve train-predictors --rank 128 --sparsity configs/smollm2-sparsity.json --out /tmp/smol-pred
    python bench/predictor_precision.py --model /tmp/smol-pred --sparsity configs/smollm2-sparsity.json

`--time` measures the other half on this CPU: the native predictor (kernels/sparse_ffn_cpu.py,
what `--quantization int8` serves) at TurboSparse-Mistral-7B's shape with bf16 weights and with
their int8 copies, batch 1, best of 15 over 4 layers' weights (no files needed).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from sparse_serve.engine.calibration.calibration_data import load_windows
from sparse_serve.engine.checkpoints.loader import load_model
from sparse_serve.engine.core.config import ModelConfig
from sparse_serve.engine.predictors.collect import collect
from sparse_serve.engine.predictors.train import evaluate_layer
from sparse_serve.engine.text.tokenizer import Tokenizer
from sparse_serve.kernels import sparse_ffn_cpu
from sparse_serve.kernels.linear_int8_cpu import quantize_int8
from sparse_serve.kernels.sparse_ffn_ref import dequantize


def int8_copy(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 as `--quantization int8` stores it, dequantised."""
    return dequantize(*quantize_int8(w))


def fp8_copy(w: torch.Tensor) -> torch.Tensor:
    """Per-row scaled float8 e4m3 (largest finite 448), dequantised."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448
    return (w.float() / scale).to(torch.float8_e4m3fn).float() * scale


VARIANTS = {"as stored": lambda w: w.float(), "int8": int8_copy, "fp8 e4m3": fp8_copy}


def time_predictor(hidden: int = 4096, neurons: int = 14336, rank: int = 1024, layers: int = 4,
                   repeats: int = 15) -> str:
    """ms per layer of the native CPU predictor at batch 1, bf16 weights against their int8 copies."""
    gen = torch.Generator().manual_seed(0)
    weights = []
    for _ in range(layers):
        fc1 = (torch.randn(rank, hidden, generator=gen) / hidden ** 0.5).to(torch.bfloat16)
        fc2 = (torch.randn(neurons, rank, generator=gen) / rank ** 0.5).to(torch.bfloat16)
        (q1, s1), (q2, s2) = quantize_int8(fc1), quantize_int8(fc2)
        weights.append(((fc1, fc2, None), (q1, q2, (s1, s2))))
    x = torch.randn(1, hidden, generator=gen)

    def best_ms(variant: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for pair in weights:
                fc1, fc2, scales = pair[variant]
                sparse_ffn_cpu.predict_active_native(x, fc1, fc2, 0.0, scales)
            best = min(best, time.perf_counter() - start)
        return best * 1e3 / layers

    bf16, int8 = best_ms(0), best_ms(1)
    return (f"predictor fc1 [{rank}, {hidden}] + fc2 [{neurons}, {rank}], batch 1, "
            f"{torch.get_num_threads()} threads, best of {repeats}: bf16 {bf16:.3f} ms, int8 {int8:.3f} ms "
            f"per layer ({bf16 / int8:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a folder written by train-predictors (required without --time)")
    parser.add_argument("--time", action="store_true", help="only the CPU predictor's time, bf16 vs int8")
    parser.add_argument("--sparsity", help="its calibrated thresholds (SwiGLU models)")
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--heldout-windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args(argv)
    if args.time:
        print(time_predictor())
        return 0
    if args.model is None:
        parser.error("--model is required (or --time)")
    cfg = ModelConfig(dtype="float32", device="cpu", sparse_kernels=False, sparsity_file=args.sparsity)
    model, _ = load_model(cfg, args.model)
    windows = load_windows(Tokenizer.from_pretrained(args.model), "heldout", args.window, args.heldout_windows)
    samples = collect(model, windows)
    stored = model.mlps[0].predictor.fc1.weight.element_size()
    rows = ["| weights | bytes / weight | mean recall | lowest layer recall | mean precision | predicted density "
            "| recall vs stored |", "|---|---|---|---|---|---|---|"]
    baseline = None
    for name, convert in VARIANTS.items():
        layers = [evaluate_layer(convert(m.predictor.fc1.weight), convert(m.predictor.fc2.weight), s, args.threshold)
                  for m, s in zip(model.mlps, samples)]
        recall = sum(m.recall for m in layers) / len(layers)
        baseline = recall if baseline is None else baseline
        rows.append(f"| {name} | {stored if name == 'as stored' else 1} | {recall:.4f} | "
                    f"{min(m.recall for m in layers):.4f} | {sum(m.precision for m in layers) / len(layers):.4f} | "
                    f"{sum(m.predicted_density for m in layers) / len(layers):.4f} | "
                    f"{(recall - baseline) * 100:+.2f} points |")
        print(rows[-1], flush=True)
    print(f"\n{datetime.date.today()}, `python bench/predictor_precision.py {' '.join(argv or sys.argv[1:])}`; "
          f"{samples[0].num_tokens} held-out tokens, threshold {args.threshold}\n\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
