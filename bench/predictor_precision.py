"""Lower-precision predictor weights: what int8 or fp8 copies of fc1/fc2 cost in recall.

The predictor reads about as many bytes as a 90%-sparse FFN (issue 17). This takes a trained
predictor folder (`sparse-serve train-predictors`) and scores its per-layer predictor on held-out
tokens against the exact activation, with its weights as stored and with per-row-scaled int8 and
fp8 (e4m3) copies (dequantised to float32 for the scoring, so only the rounding is measured).
The rule from the issue: keep a lower precision only if mean recall stays within 1 point.

    sparse-serve train-predictors --rank 128 --sparsity configs/smollm2-sparsity.json --out /tmp/smol-pred
    python bench/predictor_precision.py --model /tmp/smol-pred --sparsity configs/smollm2-sparsity.json
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch

from sparse_serve.engine.calibration.calibration_data import load_windows
from sparse_serve.engine.checkpoints.loader import load_model
from sparse_serve.engine.core.config import ModelConfig
from sparse_serve.engine.predictors.collect import collect
from sparse_serve.engine.predictors.train import evaluate_layer
from sparse_serve.engine.text.tokenizer import Tokenizer


def int8_copy(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8, dequantised."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(w.float() / scale).clamp(-127, 127) * scale


def fp8_copy(w: torch.Tensor) -> torch.Tensor:
    """Per-row scaled float8 e4m3 (largest finite 448), dequantised."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448
    return (w.float() / scale).to(torch.float8_e4m3fn).float() * scale


VARIANTS = {"as stored": lambda w: w.float(), "int8": int8_copy, "fp8 e4m3": fp8_copy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder written by train-predictors")
    parser.add_argument("--sparsity", help="its calibrated thresholds (SwiGLU models)")
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--heldout-windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args(argv)
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
