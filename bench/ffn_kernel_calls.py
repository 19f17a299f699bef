"""The sparse FFN called a few times at Mistral-7B shape (bf16, predicted mode), for a profiler.

bench/gpu_check.sh runs it under Nsight Compute when `ncu` is there, to read what the timings
alone cannot say: each kernel's DRAM throughput, occupancy and where its warps stall.

    ncu --clock-control none --kernel-name regex:'_compact_kernel|_gate_up_kernel|_gate_up_counted_kernel|_down_kernel' \
        --launch-skip 5 --launch-count 10 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --csv python bench/ffn_kernel_calls.py

Each round calls it from the mask alone (3 launches: compaction, gate/up, down), then from the
mask and the predictor's per-group counts (2 launches: gate/up counted, down; as the CUDA engine
runs it): 5 launches a round with the reduction fused into the down kernel, as batch 1's tuned
tiles have it (where not, its _reduce_kernel is outside the regex above: still 5). The first
round compiles (skip its 5 launches); the default 3 rounds leave two to profile (count 10). The
L2 is flushed before every call, as in the timings of bench/ffn_kernels.py. `--hidden/--intermediate`
shrink the layer (a CPU check under TRITON_INTERPRET=1 uses that).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sparse_serve.bench.ffn_kernels import HIDDEN, INTERMEDIATE, flush_cache, random_masks
from sparse_serve.kernels.sparse_ffn_ref import group_counts_ref
from sparse_serve.kernels.sparse_ffn_triton import sparse_ffn_triton


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--calls", type=int, default=3, help="rounds (two calls each)")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    parser.add_argument("--configs", type=Path, default=None,
                        help="JSON of tuned Triton tiles (bench/tune_triton_ffn.py --json)")
    args = parser.parse_args(argv)
    if args.configs is not None:
        from sparse_serve.bench.tune_triton_ffn import load_tuned
        load_tuned(args.configs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    H, I = args.hidden, args.intermediate
    weights = [(torch.randn(I, H, generator=gen) * H ** -0.5).to(dtype=dtype, device=device)
               for _ in range(3)]
    x = torch.randn(args.batch, H, generator=gen).to(dtype=dtype, device=device)
    mask = random_masks(args.batch, args.sparsity, gen, device, I)
    counts = group_counts_ref(mask)
    calls = [None, counts]     # the mask path, then the counted path (the engine's); tuned tiles
    for _ in range(args.calls):
        for group_counts in calls:
            flush_cache(device)
            out, _ = sparse_ffn_triton(x, *weights, "silu", 0.0, mask,
                                       predicted_group_counts=group_counts)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{args.calls} rounds of {len(calls)} calls, batch {args.batch}, {H} x {I}, "
          f"{args.sparsity:.0%} sparsity: out {tuple(out.shape)} "
          f"finite={bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    main()
