"""Perplexity vs measured FFN sparsity: dense, uniform thresholds, greedy (TEAL-style) allocation.

    .venv/bin/python bench/sparsity_quality.py                      # full table -> docs/benchmarks/sparsity.md
    .venv/bin/python bench/sparsity_quality.py --quick --out /tmp/q.md   # smoke run

NOTE: run it as a module: as a script, bench/ffn_kernels.py would shadow the kernels package.

Calibration uses the stdlib-docstring calibration split, evaluation the held-out split (disjoint
texts). Sparsity in the table is what the model's own activity counts measured on the held-out
windows. Greedy runs twice: on the second-order loss estimate alone ("estimate", the method
before issue 27's change) and with each layer's row rescaled by its measured loss ("measured",
what `sparse-serve calibrate` does by default). With --ship-sidecar, the measured greedy sidecar at the highest target whose perplexity stays
within --max-ppl-increase of dense is written (for configs/smollm2.yaml).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from sparse_serve.engine.calibration.calibrate import Calibrator, calibrate, load_for_calibration
from sparse_serve.engine.calibration.calibration_data import load_windows
from sparse_serve.engine.calibration.perplexity import evaluate
from sparse_serve.engine.checkpoints.sparsity_file import set_thresholds, write_sparsity_file

logger = logging.getLogger("sparse_serve.bench.sparsity_quality")
# Table columns: uniform; greedy on the loss estimate alone; greedy with measured-loss scales.
METHOD_COLUMNS = ("uniform", "estimate", "greedy")
LABELS = {"uniform": "uniform", "estimate": "greedy-est", "greedy": "greedy-measured"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the embedded default model)")
    parser.add_argument("--out", default="docs/benchmarks/sparsity.md")
    parser.add_argument("--targets", default="0.2,0.3,0.35,0.36,0.4,0.5,0.7")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heldout-windows", type=int, default=8)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--error-windows", type=int, default=4)
    parser.add_argument("--measure-windows", type=int, default=2,
                        help="calibration windows for the measured-loss correction (0: off)")
    parser.add_argument("--step", type=float, default=0.05)
    parser.add_argument("--max-ppl-increase", type=float, default=0.05)
    parser.add_argument("--ship-sidecar", metavar="FILE", help="write the chosen greedy sidecar here")
    parser.add_argument("--quick", action="store_true", help="2 targets, few windows: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.targets, args.heldout_windows, args.calib_windows, args.error_windows = "0.3,0.5", 2, 2, 1
        args.measure_windows = 1
    return args


def main(argv=None) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    started = time.monotonic()
    model, tokenizer, folder = load_for_calibration(args.model, "float32", "cpu")
    heldout = load_windows(tokenizer, "heldout", args.window, args.heldout_windows)
    calib = load_windows(tokenizer, "calibration", args.window, args.calib_windows)
    dense = evaluate(model, heldout)
    logger.info("dense: ppl %.3f on %d tokens", dense.perplexity, dense.num_tokens)
    calibrator = Calibrator(model, calib, error_windows=args.error_windows, step=args.step,
                            measure_windows=args.measure_windows)
    targets = [float(t) for t in args.targets.split(",")]
    rows, sidecars = [], {}
    for method in METHOD_COLUMNS if args.measure_windows else METHOD_COLUMNS[:2]:
        for target in targets:
            sidecar = calibrate(model, calib, target, "uniform" if method == "uniform" else "greedy",
                                calibrator=calibrator, model_name=Path(folder).name,
                                measure=method == "greedy")
            result = evaluate(model, heldout)
            logger.info("%s %.2f: ppl %.3f at measured sparsity %.4f", method, target,
                        result.perplexity, result.sparsity)
            rows.append((method, target, result))
            sidecars[(method, target)] = sidecar
    set_thresholds(model, [0.0] * len(model.mlps))
    limit = dense.perplexity * (1 + args.max_ppl_increase)
    shipped = "greedy" if args.measure_windows else "estimate"
    within = [(t, r) for m, t, r in rows if m == shipped and r.perplexity <= limit]
    chosen = max(within, key=lambda tr: tr[0])[0] if within else None
    if chosen is not None and args.ship_sidecar:
        sidecar = sidecars[(shipped, chosen)]
        sidecar.calibration["heldout_perplexity"] = round(dict(
            ((m, t), r) for m, t, r in rows)[(shipped, chosen)].perplexity, 3)
        sidecar.calibration["dense_heldout_perplexity"] = round(dense.perplexity, 3)
        write_sparsity_file(args.ship_sidecar, sidecar)
        logger.info("wrote %s (greedy, target %.2f)", args.ship_sidecar, chosen)
    elapsed = time.monotonic() - started
    report = render(args, dense, rows, chosen, sidecars, folder, elapsed, argv, shipped)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    logger.info("wrote %s in %.0fs", args.out, elapsed)
    return 0


def render(args, dense, rows, chosen, sidecars, folder, elapsed, argv, shipped) -> str:
    command = "python bench/sparsity_quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    by_target: dict[float, dict[str, object]] = {}
    for method, target, result in rows:
        by_target.setdefault(target, {})[method] = result
    lines = [
        "## Calibrated activation sparsity (SwiGLU, CATS thresholds)",
        "",
        f"Model: `{Path(folder).name}` (fp32, CPU). Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}, torch "
        f"{torch.__version__}. Date: {datetime.date.today().isoformat()}. Runtime {elapsed / 60:.1f} min.",
        f"Command: `{command}`",
        "",
        f"Perplexity on {dense.num_tokens} held-out tokens ({args.heldout_windows} windows of "
        f"{args.window}) of stdlib docstrings, disjoint from the {args.calib_windows} calibration "
        f"windows. Sparsity = inactive FFN neurons / all, as the model's own activity counts "
        f"measured it on the held-out windows. Greedy: sensitivity from {args.error_windows} "
        f"windows, step {args.step:.0%}"
        + (f", each layer's row rescaled by its KL measured alone on {args.measure_windows} "
           f"other calibration windows." if args.measure_windows else "."),
        "",
        f"Dense perplexity: **{dense.perplexity:.2f}**",
        "",
    ]
    methods = [m for m in METHOD_COLUMNS if any(m == row[0] for row in rows)]
    lines += ["| target | " + " | ".join(f"{LABELS[m]} {c}" for m in methods
                                         for c in ("sparsity", "ppl", "Δ")) + " |",
              "|---:|" + "---:|" * (3 * len(methods))]
    for target in sorted(by_target):
        cells = [f"{target:.0%}"]
        for method in methods:
            r = by_target[target].get(method)
            cells += ([f"{r.sparsity:.1%}", f"{r.perplexity:.2f}",
                       f"{r.perplexity / dense.perplexity - 1:+.1%}"] if r else ["-", "-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if chosen is None:
        lines.append(f"No {LABELS[shipped]} target kept perplexity within "
                     f"{args.max_ppl_increase:.0%} of dense.")
    else:
        calibration = sidecars[(shipped, chosen)].calibration
        lines += [f"Highest {LABELS[shipped]} target within {args.max_ppl_increase:.0%} of dense: "
                  f"**{chosen:.0%}**.",
                  "",
                  f"{LABELS[shipped].capitalize()} per-layer targets at {chosen:.0%}: "
                  + ", ".join(f"{t:.2f}" for t in calibration["layer_targets"])]
        if "layer_scales" in calibration:
            lines += ["", "Measured / estimated loss per layer (row scales): "
                      + ", ".join(f"{x:.2f}" for x in calibration["layer_scales"])]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
