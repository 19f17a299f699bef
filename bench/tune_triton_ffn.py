"""Tile sweep for the compacted Triton sparse FFN (predicted mode) on a GPU.

For each batch size, at Mistral-7B shape, bf16 and 90% per-row sparsity: first the gate/up
tiles are swept with the default down tiles, then the down tiles with the best gate/up ones,
then the warps of both.
Prints every configuration's CUDA-event time (minimum over repeats, cache flushed before each
call) and the best one per batch, as the line to paste into
kernels/ffn_triton_compact.py's TUNED_CONFIGS.

    python bench/tune_triton_ffn.py                 # batches 1 and 16, about 2 minutes
    python bench/tune_triton_ffn.py --batches 1 4 16 --out docs/benchmarks/triton_tuning.md
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import sys
from pathlib import Path

import torch

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.kernels import HIDDEN, INTERMEDIATE, flush_cache, random_masks, time_min  # noqa: E402
from kernels.ffn_triton_compact import DOT_MIN_ROWS, default_config  # noqa: E402
from kernels.sparse_ffn_triton import sparse_ffn_triton  # noqa: E402

logger = logging.getLogger("bench.tune_triton_ffn")

GATE_GRID = dict(gate_block_i=[4, 8, 16, 32], gate_block_h=[256, 512, 1024])
DOWN_GRID = dict(down_block_k=[8, 16, 32], down_block_h=[128, 256, 512], down_split=[8, 16, 32])
WARPS_GRID = dict(gate_warps=[2, 4, 8], down_warps=[2, 4, 8])


def _grid(spec: dict, T: int) -> list[dict]:
    combos = [dict(zip(spec, values)) for values in itertools.product(*spec.values())]
    if T >= DOT_MIN_ROWS:  # tl.dot pads these to 16: smaller values repeat a configuration
        combos = [c for c in combos
                  if c.get("gate_block_i", 16) >= 16 and c.get("down_block_k", 16) >= 16]
    return combos


def sweep(T: int, sparsity: float, repeats: int, weights, gen) -> tuple[list[tuple], object]:
    x = torch.randn(T, HIDDEN, generator=gen).to(torch.bfloat16).cuda()
    mask = random_masks(T, sparsity, gen, "cuda")
    rows = []

    def measure(config) -> float:
        (ms,) = time_min([lambda: sparse_ffn_triton(x, *weights, "silu", 0.0, mask,
                                                    compact_config=config)], repeats, "cuda")
        rows.append((T, sparsity, config, ms))
        logger.info("T=%-2d %s  %.4f ms", T, config, ms)
        return ms

    best = default_config(T)
    best_ms = measure(best)
    for stage in (GATE_GRID, DOWN_GRID, WARPS_GRID):
        for combo in _grid(stage, T):
            config = dataclasses.replace(best, **combo)
            ms = measure(config)
            if ms < best_ms:
                best, best_ms = config, ms
    logger.info("best for T=%d: %s  %.4f ms", T, best, best_ms)
    return rows, (best, best_ms)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    assert torch.cuda.is_available(), "the sweep times compiled Triton kernels: it needs a GPU"
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(INTERMEDIATE, HIDDEN, generator=gen) * HIDDEN ** -0.5)
               .to(torch.bfloat16).cuda() for _ in range(3)]
    flush_cache("cuda")
    lines = [f"# Compacted Triton FFN tile sweep ({torch.cuda.get_device_name()}, bf16, "
             f"Mistral-7B FFN, {args.sparsity:.0%} sparsity)", "",
             "| batch | config | ms |", "|---|---|---|"]
    winners = []
    for T in args.batches:
        rows, winner = sweep(T, args.sparsity, args.repeats, weights, gen)
        winners.append((T, *winner))
        lines += [f"| {t} | {c} | {ms:.4f} |" for t, _, c, ms in sorted(rows, key=lambda r: r[3])[:10]]
    for T, config, ms in winners:
        print(f"TUNED T={T}: {config} {ms:.4f} ms")
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
