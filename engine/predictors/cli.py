"""`sparse-serve train-predictors`: low-rank activation predictors for a model that has none.

    sparse-serve train-predictors --model /models/ReluLLaMA-7B --rank 1024 --out /models/ReluLLaMA-7B-pred
    sparse-serve train-predictors --rank 128 --sparsity configs/smollm2-sparsity.json --out /tmp/smollm2-pred
    sparse-serve serve --model /models/ReluLLaMA-7B-pred [--predictor-threshold 0.0]

Collects (residual stream, neuron active) pairs on the stdlib-docstring calibration split, trains
one predictor per layer (engine/predictors/train.py), reports recall and precision per layer on
the held-out split, and writes a model folder with the predictors in TurboSparse's tensor names
(engine/predictors/writer.py). A SwiGLU model needs its calibrated thresholds (`--sparsity`, from
`sparse-serve calibrate`): the predictor then learns |silu(gate)| > threshold, so the gate rows of
silent neurons are skipped too; serve the output with the same `--sparsity` file.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from sparse_serve.engine.core.config import MODEL_DTYPES
from sparse_serve.engine.predictors.train import TrainSettings, evaluate_layer, train_layer

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-serve train-predictors",
        description="Train low-rank activation predictors (fc1 -> relu -> fc2, no bias) per layer "
                    "on local calibration text and write a model folder that serves with them.")
    parser.add_argument("--model", help="local model folder (default: the embedded default model)")
    parser.add_argument("--rank", type=int, required=True, help="predictor width (fc1 rows), e.g. 1024 for 7B")
    parser.add_argument("--out", required=True, help="output model folder (must not exist or be empty)")
    parser.add_argument("--sparsity", metavar="FILE",
                        help="calibrated thresholds of a SwiGLU model (required for silu models)")
    parser.add_argument("--num-windows", type=int, default=32, help="calibration windows (training tokens)")
    parser.add_argument("--heldout-windows", type=int, default=8, help="held-out windows (evaluation)")
    parser.add_argument("--window", type=int, default=256, help="tokens per window")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per layer")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--recall-weight", type=float, default=4.0,
                        help="loss weight of an active neuron vs an inactive one (higher: more recall)")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="logit threshold the held-out recall/precision are reported at")
    parser.add_argument("--dtype", default="float32", choices=MODEL_DTYPES,
                        help="dtype the model runs in while collecting (predictors are written in "
                             "the checkpoint's own dtype)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"))
    return parser


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (its first tensor's)."""
    from sparse_serve.engine.checkpoints.loader import checkpoint_entries

    entries = checkpoint_entries(folder)
    floats = [e.torch_dtype for e in entries.values() if e.torch_dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def train_predictors(model, train_windows, heldout_windows, settings: TrainSettings,
                     threshold: float = 0.0) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[dict]]:
    """(fc1, fc2) per layer and each layer's held-out metrics (as dicts)."""
    from sparse_serve.engine.predictors.collect import collect

    start = time.monotonic()
    train = collect(model, train_windows)
    heldout = collect(model, heldout_windows)
    logger.info("train-predictors: collected %d training and %d held-out tokens per layer in %.1fs",
                train[0].num_tokens, heldout[0].num_tokens, time.monotonic() - start)
    predictors, metrics = [], []
    for i, (layer, samples, held) in enumerate(zip(model.model.layers, train, heldout)):
        t0 = time.monotonic()
        fc1, fc2 = train_layer(samples, layer.mlp.gate_proj.weight.detach().cpu(),
                               layer.post_attention_layernorm.weight.detach().cpu(), settings)
        result = evaluate_layer(fc1, fc2, held, threshold)
        predictors.append((fc1, fc2))
        metrics.append({"layer": i, **result.as_dict()})
        logger.info("layer %2d: recall %.3f precision %.3f predicted %.3f exact %.3f (%.1fs)", i,
                    result.recall, result.precision, result.predicted_density, result.exact_density,
                    time.monotonic() - t0)
    return predictors, metrics


def main_train_predictors(argv: Sequence[str] | None = None) -> int:
    from sparse_serve.engine.calibration.calibrate import load_for_calibration
    from sparse_serve.engine.calibration.calibration_data import load_windows
    from sparse_serve.engine.checkpoints.sparsity_file import apply_sparsity_file
    from sparse_serve.engine.core.errors import ModelLoadError
    from sparse_serve.engine.predictors.writer import write_predictor_folder

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.rank < 2:
        logger.error("--rank must be at least 2, got %d", args.rank)
        return 2
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        logger.error("%s exists and is not an empty folder", out)
        return 2
    try:
        model, tokenizer, folder = load_for_calibration(args.model, args.dtype, args.device)
        acts = {mlp.act for mlp in model.mlps}
        if args.sparsity:
            apply_sparsity_file(model, args.sparsity)
        elif acts == {"silu"}:
            logger.error("%s is a SwiGLU (silu) model: pass its calibrated thresholds with --sparsity "
                         "FILE (from `sparse-serve calibrate`), or every neuron counts as active", folder)
            return 2
    except ModelLoadError as exc:
        logger.error("%s", exc)
        return 1
    settings = TrainSettings(rank=args.rank, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                             recall_weight=args.recall_weight, seed=args.seed)
    train_windows = load_windows(tokenizer, "calibration", args.window, args.num_windows)
    heldout_windows = load_windows(tokenizer, "heldout", args.window, args.heldout_windows)
    predictors, metrics = train_predictors(model, train_windows, heldout_windows, settings, args.threshold)
    mean = {k: sum(m[k] for m in metrics) / len(metrics) for k in ("recall", "precision", "predicted_density",
                                                                     "exact_density")}
    report = {"format": "sparse-serve-predictors/1", "model": Path(folder).name, "rank": args.rank,
              "act": sorted(acts)[0], "sparsity_file": args.sparsity, "threshold": args.threshold,
              "training": {"data": "stdlib docstrings (calibration split)",
                           "num_tokens": sum(len(w) for w in train_windows), "steps": args.steps,
                           "lr": args.lr, "batch_size": args.batch_size, "recall_weight": args.recall_weight,
                           "seed": args.seed},
              "heldout": {"data": "stdlib docstrings (held-out split)",
                          "num_tokens": sum(len(w) for w in heldout_windows),
                          "mean": {k: round(v, 4) for k, v in mean.items()}, "layers": metrics}}
    try:
        write_predictor_folder(folder, out, predictors, checkpoint_dtype(Path(folder)), report)
    except (OSError, ValueError) as exc:
        logger.error("cannot write %s: %s", out, exc)
        return 1
    logger.info("wrote %s: %d predictors of rank %d; held-out mean recall %.3f, precision %.3f, "
                "predicted active %.3f (exact %.3f) at threshold %g", out, len(predictors), args.rank,
                mean["recall"], mean["precision"], mean["predicted_density"], mean["exact_density"],
                args.threshold)
    logger.info("serve it: sparse-serve serve --model %s%s", out,
                f" --sparsity {args.sparsity}" if args.sparsity else "")
    return 0
