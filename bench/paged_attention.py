"""Paged-attention decode on a GPU: the Triton kernel's configurations against each other and
the torch path.

Mistral-7B attention (32 query heads over 8 KV heads of 128, KV blocks of 16 positions,
bf16), for each number of sequences and context length: every configuration (positions per
program (the split-KV partition) / positions per step x warps) is checked against
kernels/paged_attention_ref.py, then timed as a CUDA-graph replay from a flushed L2
(bench/ffn_kernels.py's timer; the split kernel and its reduce together), next to the torch
reference (what the engine would run without the kernel). GB/s counts the K/V bytes the kernel
must read. The defaults of kernels/paged_attention_triton.py come from this table (H100).

    python bench/paged_attention.py --out docs/benchmarks/paged_attention_gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from sparse_serve.bench.ffn_kernels import flush_cache, time_min
from sparse_serve.kernels.paged_attention_ref import paged_attention_decode_ref
from sparse_serve.kernels.paged_attention_triton import paged_attention_decode_triton

HQ, HKV, HEAD_DIM, BLOCK = 32, 8, 128, 16     # Mistral-7B
# (partition, positions per step, warps); the first is the launcher's default.
CONFIGS = [(128, 32, 4),
           (128, 16, 4), (128, 64, 4),
           (256, 16, 4), (256, 32, 4), (256, 64, 4), (256, 32, 8), (256, 64, 8),
           (512, 32, 4), (512, 64, 4), (512, 64, 8),
           (1024, 64, 4)]


def make_case(S: int, context: int, gen: torch.Generator, device: str):
    """A KV cache whose blocks are shuffled across sequences, as a paged allocator leaves them."""
    blocks_per_seq = -(-context // BLOCK)
    num_blocks = S * blocks_per_seq
    bf16 = dict(dtype=torch.bfloat16, device=device)
    k = torch.randn(num_blocks, BLOCK, HKV, HEAD_DIM, generator=gen).to(**bf16)
    v = torch.randn(num_blocks, BLOCK, HKV, HEAD_DIM, generator=gen).to(**bf16)
    tables = torch.randperm(num_blocks, generator=gen).reshape(S, blocks_per_seq)
    q = torch.randn(S, HQ, HEAD_DIM, generator=gen).to(**bf16)
    lens = torch.full((S,), context, dtype=torch.int32)
    return q, k, v, tables.to(torch.int32).to(device), lens.to(device)


def bench_case(S: int, context: int, gen: torch.Generator, repeats: int,
               device: str = "cuda") -> str:
    """One table row: the torch reference's time, then each configuration's (or WRONG)."""
    args = (*make_case(S, context, gen, device), HEAD_DIM ** -0.5)
    ref = paged_attention_decode_ref(*args)
    kv_bytes = 2 * S * context * HKV * HEAD_DIM * 2
    calls, wrong = [], []
    for p, n, w in CONFIGS:
        def call(p=p, n=n, w=w):
            return paged_attention_decode_triton(*args, max_context_len=context, partition=p,
                                                 block_n=n, num_warps=w)
        wrong.append((call().float() - ref.float()).abs().max().item() > 2e-2)
        calls.append(call)
    times = time_min(calls, repeats, device)
    try:  # the reference is timed apart: a capture failure of its ops must not lose the row
        (ref_ms,) = time_min([lambda: paged_attention_decode_ref(*args)], repeats, device)
        cells = [f"{ref_ms * 1e3:.1f}"]
    except Exception as exc:  # noqa: BLE001
        cells = [f"n/a ({type(exc).__name__})"]
    cells += ["WRONG" if bad else f"{t * 1e3:.1f} ({kv_bytes / t / 1e6:.0f})"
              for t, bad in zip(times, wrong, strict=True)]
    return f"| {S} | {context} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 4096])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark times the compiled kernel: it needs a GPU"
    gen = torch.Generator().manual_seed(0)
    flush_cache("cuda")
    rows = ["| seqs | context | torch ref us | "
            + " | ".join(f"{p}/{n}x{w} us (GB/s)" for p, n, w in CONFIGS) + " |",
            "|---|---|---|" + "---|" * len(CONFIGS)]
    for S in args.seqs:
        for context in args.contexts:
            rows.append(bench_case(S, context, gen, args.repeats))
            print(rows[-1], flush=True)
    lines = ["# Paged-attention decode (Triton) on a GPU", "",
             f"- Device: {torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- Command: `python bench/paged_attention.py {' '.join(sys.argv[1:])}`",
             f"- {HQ} query heads over {HKV} KV heads of {HEAD_DIM}, KV blocks of {BLOCK}, bf16; "
             "CUDA-graph replays from a flushed L2, minimum over repeats; columns are positions per "
             "program / positions per step x warps; GB/s on the K/V bytes read.", ""] + rows
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
