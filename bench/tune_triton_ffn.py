"""Tile sweep for the compacted Triton sparse FFN (predicted mode) and the predictor on a GPU.

For each batch bucket, at Mistral-7B shape, bf16 and 90% per-row sparsity, on the path the CUDA
engine runs (the mask and the predictor's per-group counts; `--from-mask`: the mask alone, with
the compaction launch, whose scan is then swept first): the gate/up tile's columns, then its
rows with its warps and the gate/up programs per SM, then the down tiles with their warps and
the split, then the reduction (a launch of its own, or fused into the down kernel), then the
pipelining depths, each stage starting from the best so far; then exact mode's gate pass; then
the predictor's tiles (rank 1024, counting groups unless --from-mask). Ends with a per-kernel
profile at batch 1. `--sweep` picks what to sweep; what is not swept is timed once at its
current tiles. Batches above 8 rows are not swept by default:
the dispatch sends them to cuBLAS (kernels/sparse_ffn.py, CUDA_SPARSE_MAX_ROWS).
Each configuration is timed as a CUDA-graph replay from a flushed cache (bench/ffn_kernels.py's
timer); configurations the GPU cannot run (shared memory) or that give a wrong result (checked
against the torch reference before timing) are skipped. Prints the winners, as the entries of
TUNED_CONFIGS in kernels/ffn_triton_compact.py and kernels/predictor_triton.py, and can save
them as JSON for `bench/ffn_kernels.py --configs`.

    python bench/tune_triton_ffn.py --json tuned.json     # batches 1 and 4: ~3 minutes
    python bench/tune_triton_ffn.py --batches 1 --sweep predictor --json tuned.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
from pathlib import Path

import torch

from sparse_serve.bench.ffn_kernels import (
    HIDDEN,
    INTERMEDIATE,
    exact_threshold,
    flush_cache,
    random_masks,
    time_min,
)
from sparse_serve.kernels import ffn_triton_compact, predictor_triton, sparse_ffn_triton
from sparse_serve.kernels.ffn_triton_compact import CompactConfig, default_config
from sparse_serve.kernels.predictor_triton import PredictorConfig, predict_active_triton
from sparse_serve.kernels.sparse_ffn_ref import group_counts_ref, sparse_ffn_ref
from sparse_serve.kernels.triton_utils import DOT_MIN_ROWS, tuned_for

logger = logging.getLogger("sparse_serve.bench.tune_triton_ffn")

COMPACTION_STAGE = dict(scan_block=[0, 512, 1024, 2048])   # (--from-mask only)
# Grids bracket the H100 winners (TUNED_CONFIGS; batch 1: gate/up 1 x 2048, 1 warp, 12 programs
# per SM; down 32 x 128, 1 warp, split 32) and keep the sweep near 2 minutes (gpu_check.sh's 5).
FFN_STAGES = [
    dict(gate_block_h=[512, 1024, 2048, 4096]),   # the gate/up tile's columns per step
    # its rows, warps and the grid together: a wide tile needs the warps to hold it (a greedy
    # sweep of one then the other never tries a wide tile with many warps), and more programs
    # per SM need fewer registers a program (and balance the slot blocks over the SMs
    # differently); _grid drops the tiles that leave a thread too few or too many elements
    dict(gate_block_i=[1, 2, 4, 16, 32], gate_warps=[1, 2, 4, 8],
         gate_programs_per_sm=[2, 4, 8, 12, 16]),
    # the down tile, its warps and the split together: at batch 1, 90% the list is ~1430 slots
    # long, and block_k x split decides how many steps a program takes (one step: every load of
    # a program in flight at once) and how many programs there are
    dict(down_block_k=[16, 32, 64, 128], down_block_h=[64, 128, 256], down_warps=[1, 2, 4],
         down_split=[16, 32]),
    dict(down_fused_reduce=[False, True]),
    # (made no difference at one row: docs/benchmarks/kernels_gpu.md#tuned-tiles)
    dict(gate_stages=[2, 3], down_stages=[1, 3]),
]
# elements of a weight tile per thread that the multiply-reduce path (below DOT_MIN_ROWS rows)
# is swept over: fewer leaves too few loads in flight, more spills registers
PER_THREAD = (16, 256)
# exact mode's dense gate pass (the rest of its tiles are predicted mode's winners)
EXACT_STAGES = [dict(gate_pass_block_i=[4, 8, 16, 32], gate_pass_block_h=[512, 1024, 2048]),
                dict(gate_pass_warps=[2, 4, 8])]
# fc2's tiles, then fc1's (r ~ 1000 outputs: narrower tiles give it more programs)
PREDICTOR_STAGES = [dict(block_n=[4, 8, 16, 32], block_k=[256, 512, 1024]), dict(warps=[2, 4, 8]),
                    dict(fc1_block_n=[1, 2, 4, 8, 16], fc1_block_k=[256, 512, 1024, 2048]),
                    dict(fc1_warps=[1, 2, 4, 8])]
PREDICTOR_RANK = 1024


def _per_thread(config, keys) -> list[float]:
    """Weight elements per thread of the gate/up tile (gate and up) and of the down tile,
    for the kernels whose tiles `keys` change."""
    counts = []
    if keys & {"gate_block_i", "gate_block_h", "gate_warps"}:
        counts.append(2 * config.gate_block_i * config.gate_block_h / (32 * config.gate_warps))
    if keys & {"down_block_k", "down_block_h", "down_warps"}:
        counts.append(config.down_block_k * config.down_block_h / (32 * config.down_warps))
    return counts


def _grid(spec: dict, T: int, base=None) -> list[dict]:
    combos = [dict(zip(spec, values)) for values in itertools.product(*spec.values())]
    if T >= DOT_MIN_ROWS:  # tl.dot pads these to 16: smaller values repeat a configuration
        combos = [c for c in combos if all(c.get(k, 16) >= 16 for k in
                                           ("gate_block_i", "down_block_k", "block_n",
                                            "fc1_block_n"))]
    elif isinstance(base, CompactConfig):
        lo, hi = PER_THREAD
        combos = [c for c in combos
                  if all(lo <= n <= hi
                         for n in _per_thread(dataclasses.replace(base, **c), set(c)))]
    return combos


def _sweep(label: str, start, stages: list[dict], T: int, call, repeats: int, sweep: bool = True,
           check=None):
    def measure(config) -> float:
        try:
            if check is not None and not check(call(config)):
                logger.info("%s T=%-2d %s  WRONG RESULT: skipped", label, T, config)
                return float("inf")
            (ms,) = time_min([lambda: call(config)], repeats, "cuda")
        except Exception as exc:  # noqa: BLE001 - e.g. triton OutOfResources: skip the tile
            logger.info("%s T=%-2d %s  skipped: %s", label, T, config, str(exc).splitlines()[0])
            return float("inf")
        logger.info("%s T=%-2d %s  %.4f ms", label, T, config, ms)
        return ms

    best, best_ms = start, measure(start)
    for stage in stages if sweep else []:
        for combo in _grid(stage, T, best):
            config = dataclasses.replace(best, **combo)
            ms = measure(config)
            if ms < best_ms:
                best, best_ms = config, ms
    logger.info("best %s for T=%d: %s  %.4f ms", label, T, best, best_ms)
    return best, best_ms


def matches(ref_out, ref_active):
    """A check of an FFN call's (out, active) against the reference (every tile is checked
    before it is timed)."""
    scale = ref_out.float().abs().max().item()

    def check(result) -> bool:
        out, active = result
        return (torch.equal(active, ref_active)
                and (out.float() - ref_out.float()).abs().max().item() <= 2e-2 * scale)
    return check


def sweep_exact(x, weights, sparsity: float, start: CompactConfig, T: int,
                repeats: int) -> CompactConfig:
    """Exact mode (fatrelu at the `sparsity` quantile of the gate): the gate pass's tiles."""
    thr = exact_threshold(x, weights[0], sparsity)
    check = matches(*sparse_ffn_ref(x, *weights, "fatrelu", thr))

    def call(config):
        return sparse_ffn_triton.sparse_ffn_triton(x, *weights, "fatrelu", thr,
                                                   compact_config=config)
    best, _ = _sweep("exact", start, EXACT_STAGES, T, call, repeats, check=check)
    return best


def load_tuned(path: Path) -> None:
    """Install the tiles saved by --json as the kernels' defaults (for bench/ffn_kernels.py)."""
    saved = json.loads(path.read_text())
    for bucket, fields in saved["ffn"].items():
        ffn_triton_compact.TUNED_CONFIGS[int(bucket)] = CompactConfig(**fields)
    for bucket, fields in saved["predictor"].items():
        predictor_triton.TUNED_CONFIGS[int(bucket)] = PredictorConfig(**fields)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, DOT_MIN_ROWS])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", nargs="+", choices=["compact", "exact", "predictor"],
                        default=["compact", "exact", "predictor"])
    parser.add_argument("--json", type=Path, default=None, help="save the winners here")
    parser.add_argument("--from-mask", action="store_true",
                        help="sweep the FFN given the mask alone (compaction launch), not the "
                             "mask and the predictor's group counts")
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

    def save(winners: dict) -> None:
        if args.json is not None:
            args.json.write_text(json.dumps(winners, indent=1) + "\n")
    for T in args.batches:
        x = torch.randn(T, HIDDEN, generator=gen).to(**bf16)
        mask = random_masks(T, args.sparsity, gen, "cuda")
        ref_out, ref_active = sparse_ffn_ref(x, *weights, "silu", 0.0, mask)
        counts = None if args.from_mask else group_counts_ref(mask)
        # the predictor counting its neurons per group, as the engine runs it (own buffer)
        pred_counts = None if counts is None else torch.empty_like(counts)
        stages = [COMPACTION_STAGE, *FFN_STAGES] if args.from_mask else FFN_STAGES

        ffn, ffn_ms = _sweep("compact", default_config(T), stages, T,
                             lambda c: sparse_ffn_triton.sparse_ffn_triton(
                                 x, *weights, "silu", 0.0, mask, compact_config=c,
                                 predicted_group_counts=counts), args.repeats,
                             "compact" in args.sweep, check=matches(ref_out, ref_active))
        if "exact" in args.sweep and T < DOT_MIN_ROWS:   # more rows: the masked kernels
            ffn = sweep_exact(x, weights, args.sparsity, ffn, T, args.repeats)
        tuned["ffn"][T] = dataclasses.asdict(ffn)
        save(tuned)   # after each sweep: one cut short keeps what came before
        pred, pred_ms = _sweep("predictor", tuned_for(predictor_triton.TUNED_CONFIGS, T),
                               PREDICTOR_STAGES, T,
                               lambda c: predict_active_triton(x, fc1, fc2, 0.0, config=c,
                                                               group_counts=pred_counts),
                               args.repeats, "predictor" in args.sweep)
        tuned["predictor"][T] = dataclasses.asdict(pred)
        print(f"TUNED T={T}: {ffn} {ffn_ms:.4f} ms | {pred} {pred_ms:.4f} ms")
        save(tuned)
    if args.json is not None:
        load_tuned(args.json)
        profile_kernels(weights, fc1, fc2, args.sparsity, gen)


def profile_kernels(weights, fc1, fc2, sparsity: float, gen) -> None:
    """Per-kernel CUDA time at batch 1 on the tuned tiles (torch profiler, eager calls)."""
    x = torch.randn(1, HIDDEN, generator=gen).to(dtype=torch.bfloat16, device="cuda")
    mask = random_masks(1, sparsity, gen, "cuda")
    counts = group_counts_ref(mask)
    ffn = sparse_ffn_triton.sparse_ffn_triton
    calls = {"sparse FFN from the mask": lambda: ffn(x, *weights, "silu", 0.0, mask),
             "sparse FFN from the mask and group counts": lambda: ffn(
                 x, *weights, "silu", 0.0, mask, predicted_group_counts=counts),
             "predictor counting groups": lambda: predict_active_triton(
                 x, fc1, fc2, group_counts=torch.empty_like(counts))}
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
        if name.startswith("predictor"):
            print_launches_apart(prof, "_linear_epilogue_kernel", ("fc1", "fc2"))


def print_launches_apart(prof, kernel: str, labels: tuple[str, ...]) -> None:
    """Mean time of each of a call's launches of one kernel (the profiler's table averages them
    together under the one name): the i-th of every len(labels) consecutive launches is
    labels[i]."""
    launches = sorted((e for e in prof.events() if e.name == kernel
                       and e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    for i, label in enumerate(labels):
        times = [e.time_range.elapsed_us() for e in launches[i::len(labels)]]
        if times:
            print(f"   {kernel} {label}: {sum(times) / len(times):.1f} us mean of {len(times)}")


if __name__ == "__main__":
    main()
