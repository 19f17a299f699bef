"""Paged-attention decode on the CPU: the native kernel that reads K/V in place against the
torch path it replaced (gather every context, then SDPA), both through the attention layer's own
decode (engine/models/attention.py `_decode`), for SmolLM2-135M's heads (9 over 3, 64 wide) and
Mistral-7B's (32 over 8, 128 wide), float32 and bfloat16, on KV blocks shuffled across sequences.
`--layers N` gives each case N layers' caches, attended in turn as a decode step does (ms per
layer): past the L3, every K and V row then comes from memory, which one layer's cache, read again
and again, hides.

    python bench/paged_attention_cpu.py --threads 1 --out docs/benchmarks/paged_attention_cpu.md
    python bench/paged_attention_cpu.py --heads smollm2 --seqs 16 --contexts 80 256 --layers 30
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from unittest import mock

import torch

from sparse_serve.bench.throughput import machine
from sparse_serve.engine.models.attention import Attention, AttentionMetadata
from sparse_serve.engine.models.layers import RotaryEmbedding
from sparse_serve.kernels import paged_attention_cpu

HEADS = {"smollm2": (9, 3, 64), "mistral7b": (32, 8, 128)}
BLOCK = 16


def decode_case(heads: str, dtype: torch.dtype, seqs: int, context: int, layers: int, gen: torch.Generator):
    """The attention layer, q, `layers` (k, v) caches sharing one block table, and the metadata."""
    hq, hkv, d = HEADS[heads]
    attn = Attention(hq * d, hq, hkv, d, RotaryEmbedding(d, 10000.0, 2 * context, 1.0), None)
    per_seq = -(-context // BLOCK)
    caches = [torch.randn(2, seqs * per_seq, BLOCK, hkv, d, generator=gen).to(dtype) for _ in range(layers)]
    tables = torch.randperm(seqs * per_seq, generator=gen).view(seqs, per_seq).int()
    meta = AttentionMetadata(query_lens=[1] * seqs, seq_lens=[context] * seqs, block_tables=tables,
                             seq_lens_tensor=torch.full((seqs,), context, dtype=torch.int32), block_size=BLOCK)
    q = torch.randn(seqs, hq, d, generator=gen).to(dtype)
    return attn, q, [(c[0], c[1]) for c in caches], meta


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--contexts", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--threads", type=int, default=None, help="torch and OpenMP threads (default: all)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS))
    parser.add_argument("--layers", type=int, default=1,
                        help="caches attended in turn per timing, as a decode step's layers (ms per layer)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)   # read when the native library loads
    probe = torch.zeros(1, 1, 1, 8)
    assert paged_attention_cpu.native_supported(probe[0], probe, probe), "the native CPU kernels did not build"
    gen = torch.Generator().manual_seed(0)
    per = " per layer" if args.layers > 1 else ""
    lines = [f"| heads | dtype | seqs | context | native ms{per} | torch gather ms{per} | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for heads in args.heads:
        for dtype in (torch.float32, torch.bfloat16):
            for seqs in args.seqs:
                for context in args.contexts:
                    attn, q, caches, meta = decode_case(heads, dtype, seqs, context, args.layers, gen)

                    def step():
                        for k, v in caches:
                            attn._decode(q, k, v, meta)

                    native = best_ms(step, args.repeats) / args.layers
                    with mock.patch.object(paged_attention_cpu, "native_supported", return_value=False):
                        gather = best_ms(step, args.repeats) / args.layers
                    lines.append(f"| {heads} | {str(dtype).removeprefix('torch.')} | {seqs} | {context} | "
                                 f"{native:.3f} | {gather:.3f} | {gather / native:.2f}x |")
                    print(lines[-1], flush=True)
    report = (f"# CPU paged-attention decode: in place vs gather\n\n{datetime.date.today()}, {machine()}, "
              f"load average {os.getloadavg()[0]:.1f}; `python bench/paged_attention_cpu.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`; best of {args.repeats}.\n\n"
              + "\n".join(lines) + "\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
