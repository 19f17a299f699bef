"""Tile sweep for the compacted Triton sparse FFN (predicted mode) and the predictor on a GPU.

For each batch bucket, at Mistral-7B shape, bf16 and 90% per-row sparsity: the gate/up tiles
are swept with the current down tiles, then the down tiles with the best gate/up ones, then the
warps of both; at batch 1, the blockwise small-batch kernels' tiles too (and which of the two
paths wins); then the predictor's tiles (rank 1024). Ends with a per-kernel profile at batch 1.
`--sweep` picks what to sweep; what is not swept is timed once at its current tiles. Each configuration is timed as a
CUDA-graph replay from a flushed cache (bench/kernels.py's timer); configurations the GPU
cannot run (shared memory) are skipped. Prints the winners, as the entries of TUNED_CONFIGS in
kernels/ffn_triton_compact.py and kernels/predictor_triton.py, and can save them as JSON for
`bench/kernels.py --configs`.

    python bench/tune_triton_ffn.py --json tuned.json     # batches 1, 4 and 16: ~2 minutes
    python bench/tune_triton_ffn.py --batches 1 --sweep blockwise --json tuned.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys
from pathlib import Path

import torch

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.kernels import HIDDEN, INTERMEDIATE, flush_cache, random_masks, time_min  # noqa: E402
from kernels import ffn_triton_blockwise, ffn_triton_compact, predictor_triton, sparse_ffn_triton  # noqa: E402
from kernels.ffn_triton_compact import DOT_MIN_ROWS, CompactConfig, default_config  # noqa: E402
from kernels.predictor_triton import PredictorConfig, predict_active_triton  # noqa: E402
from kernels.ffn_triton_blockwise import BlockwiseConfig  # noqa: E402

logger = logging.getLogger("bench.tune_triton_ffn")

FFN_STAGES = [
    dict(gate_block_i=[4, 8, 16, 32], gate_block_h=[256, 512, 1024]),
    dict(down_block_k=[8, 16, 32], down_block_h=[128, 256, 512], down_split=[8, 16, 32]),
    dict(gate_warps=[2, 4, 8], down_warps=[2, 4, 8]),
]
BLOCKWISE_STAGES = [
    dict(gate_block_n=[32, 64, 128], gate_block_i=[8, 16, 32]),
    dict(gate_block_h=[512, 1024, 2048], gate_warps=[2, 4, 8]),
    dict(down_block_n=[64, 128, 256], down_block_i=[8, 16, 32]),
    dict(down_block_h=[128, 256, 512], down_split=[8, 16, 32]),
    dict(down_warps=[2, 4, 8]),
]
PREDICTOR_STAGES = [dict(block_n=[4, 8, 16, 32], block_k=[256, 512, 1024]), dict(warps=[2, 4, 8])]
PREDICTOR_RANK = 1024


def _grid(spec: dict, T: int) -> list[dict]:
    combos = [dict(zip(spec, values)) for values in itertools.product(*spec.values())]
    if T >= DOT_MIN_ROWS:  # tl.dot pads these to 16: smaller values repeat a configuration
        combos = [c for c in combos if all(c.get(k, 16) >= 16 for k in
                                           ("gate_block_i", "down_block_k", "block_n"))]
    return combos


def _sweep(label: str, start, stages: list[dict], T: int, call, repeats: int, sweep: bool = True):
    def measure(config) -> float:
        try:
            (ms,) = time_min([lambda: call(config)], repeats, "cuda")
        except Exception as exc:  # noqa: BLE001 - e.g. triton OutOfResources: skip the tile
            logger.info("%s T=%-2d %s  skipped: %s", label, T, config, str(exc).splitlines()[0])
            return float("inf")
        logger.info("%s T=%-2d %s  %.4f ms", label, T, config, ms)
        return ms

    best, best_ms = start, measure(start)
    for stage in stages if sweep else []:
        for combo in _grid(stage, T):
            config = dataclasses.replace(best, **combo)
            ms = measure(config)
            if ms < best_ms:
                best, best_ms = config, ms
    logger.info("best %s for T=%d: %s  %.4f ms", label, T, best, best_ms)
    return best, best_ms


def load_tuned(path: Path) -> None:
    """Install the tiles saved by --json as the kernels' defaults (for bench/kernels.py)."""
    saved = json.loads(path.read_text())
    for bucket, fields in saved["ffn"].items():
        ffn_triton_compact.TUNED_CONFIGS[int(bucket)] = CompactConfig(**fields)
    if "blockwise" in saved:
        ffn_triton_blockwise.TUNED_CONFIG = BlockwiseConfig(**saved["blockwise"])
        sparse_ffn_triton.SMALL_BATCH_PATH = saved["small_batch_path"]
    for bucket, fields in saved["predictor"].items():
        predictor_triton.TUNED_CONFIGS[int(bucket)] = PredictorConfig(**fields)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, DOT_MIN_ROWS, 16])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", nargs="+", choices=["compact", "blockwise", "predictor"],
                        default=["compact", "blockwise", "predictor"])
    parser.add_argument("--json", type=Path, default=None, help="save the winners here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    assert torch.cuda.is_available(), "the sweep times compiled Triton kernels: it needs a GPU"
    gen = torch.Generator().manual_seed(0)
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    weights = [(torch.randn(INTERMEDIATE, HIDDEN, generator=gen) * HIDDEN ** -0.5).to(**bf16)
               for _ in range(3)]
    fc1 = (torch.randn(PREDICTOR_RANK, HIDDEN, generator=gen) * HIDDEN ** -0.5).to(**bf16)
    fc2 = (torch.randn(INTERMEDIATE, PREDICTOR_RANK, generator=gen) * PREDICTOR_RANK ** -0.5).to(**bf16)
    flush_cache("cuda")
    tuned: dict = {"ffn": {}, "predictor": {}}
    for T in args.batches:
        x = torch.randn(T, HIDDEN, generator=gen).to(**bf16)
        mask = random_masks(T, args.sparsity, gen, "cuda")
        ffn, ffn_ms = _sweep("compact", default_config(T), FFN_STAGES, T,
                             lambda c: sparse_ffn_triton.sparse_ffn_triton(
                                 x, *weights, "silu", 0.0, mask, compact_config=c,
                                 small_batch_path="compact"), args.repeats,
                             "compact" in args.sweep)
        if T == 1:
            blockwise, blockwise_ms = _sweep(
                "blockwise", ffn_triton_blockwise.TUNED_CONFIG, BLOCKWISE_STAGES, T,
                lambda c: sparse_ffn_triton.sparse_ffn_triton(
                    x, *weights, "silu", 0.0, mask, blockwise_config=c,
                    small_batch_path="blockwise"), args.repeats, "blockwise" in args.sweep)
            # NOTE: the winners timed again side by side (interleaved): a minimum taken over a
            # sweep is biased low against a configuration timed once.
            ffn_ms, blockwise_ms = time_min([
                lambda: sparse_ffn_triton.sparse_ffn_triton(
                    x, *weights, "silu", 0.0, mask, compact_config=ffn, small_batch_path="compact"),
                lambda: sparse_ffn_triton.sparse_ffn_triton(
                    x, *weights, "silu", 0.0, mask, blockwise_config=blockwise,
                    small_batch_path="blockwise")], 3 * args.repeats, "cuda")
            tuned["blockwise"] = dataclasses.asdict(blockwise)
            tuned["small_batch_path"] = "blockwise" if blockwise_ms < ffn_ms else "compact"
            print(f"TUNED blockwise T=1: {blockwise} {blockwise_ms:.4f} ms vs compact {ffn_ms:.4f} ms")
        start = predictor_triton.TUNED_CONFIGS[max(b for b in predictor_triton.TUNED_CONFIGS if b <= T)]
        pred, pred_ms = _sweep("predictor", start, PREDICTOR_STAGES, T,
                               lambda c: predict_active_triton(x, fc1, fc2, 0.0, config=c),
                               args.repeats, "predictor" in args.sweep)
        tuned["ffn"][T], tuned["predictor"][T] = dataclasses.asdict(ffn), dataclasses.asdict(pred)
        print(f"TUNED T={T}: {ffn} {ffn_ms:.4f} ms | {pred} {pred_ms:.4f} ms")
    if args.json is not None:
        args.json.write_text(json.dumps(tuned, indent=1) + "\n")
        load_tuned(args.json)
        profile_kernels(weights, fc1, fc2, args.sparsity, gen)


def profile_kernels(weights, fc1, fc2, sparsity: float, gen) -> None:
    """Per-kernel CUDA time at batch 1 on the tuned tiles (torch profiler, eager calls)."""
    x = torch.randn(1, HIDDEN, generator=gen).to(dtype=torch.bfloat16, device="cuda")
    mask = random_masks(1, sparsity, gen, "cuda")
    calls = {path: (lambda p=path: sparse_ffn_triton.sparse_ffn_triton(
        x, *weights, "silu", 0.0, mask, small_batch_path=p)) for path in sparse_ffn_triton.SMALL_BATCH_PATHS}
    calls["predictor"] = lambda: predict_active_triton(x, fc1, fc2)
    for name, fn in calls.items():
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                flush_cache("cuda")
                fn()
            torch.cuda.synchronize()
        print(f"== per-kernel CUDA time, T=1, {name} (20 calls, flush kernel included)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
