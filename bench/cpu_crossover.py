"""Where the CPU dense path beats the native sparse FFN kernel: rows x shape x dtype x mode.

For each shape (SmolLM2-135M: hidden 576, intermediate 1536, 30 layers; Llama-3.2-1B: 2048 x
8192, one layer; Mistral-7B: 4096 x 14336, one layer), dtype and number of rows, the time per
layer of `dense_ffn` (torch/MKL in the weights' dtype) and of the native kernel
(`sparse_ffn_native`, no fallback) in:
- exact mode `exact:S`: calibrated SwiGLU, silu with the |silu(g)| threshold that leaves S of
  the (row, neuron) pairs off (the engine's calibrated-threshold configs);
- predicted mode `pred:S`: an independent random mask per row with S of the neurons off.
Weights sit on transparent huge pages as the engine loads them (engine/worker/huge_pages.py); every
call runs all the shape's layers, after a read of 64 MB that evicts the last-level cache, and
the time is the minimum over repeats divided by the layers. The numbers feed the CPU defaults in
kernels/sparse_ffn.py (`default_dense_fallback`).

    python bench/cpu_crossover.py                                  # fp32, every shape
    python bench/cpu_crossover.py --shapes smollm2 --dtypes bf16 --rows 1 16 64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_serve.engine.worker.huge_pages import copy_to_huge_pages
from sparse_serve.kernels import sparse_ffn_cpu
from sparse_serve.kernels.sparse_ffn_ref import dense_ffn

SHAPES = {"smollm2": (576, 1536, 30), "llama1b": (2048, 8192, 1), "mistral": (4096, 14336, 1)}
# (hidden, intermediate, layers); llama1b is Llama-3.2-1B's FFN, between the other two
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def per_layer_ms(layers: list, call, repeats: int, flush: torch.Tensor) -> float:
    """Minimum over repeats of one pass of `call(w_gate, w_up, w_down_t)` over all layers, per
    layer, each pass after evicting the last-level cache."""
    for ws in layers:
        call(*ws)
    best = float("inf")
    for _ in range(repeats):
        flush.sum()
        start = time.perf_counter()
        for ws in layers:
            call(*ws)
        best = min(best, (time.perf_counter() - start) * 1e3 / len(layers))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 12, 16, 32, 64])
    parser.add_argument("--modes", nargs="+",
                        default=["exact:0.3", "exact:0.7", "pred:0.0", "pred:0.5", "pred:0.7",
                                 "pred:0.9"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    flush = torch.ones(16 << 20)  # 64 MB of float32 (2x the L3), read before every timed call
    print(f"load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}, "
          f"{torch.get_num_threads()} threads; ms per layer, native (dense / native)")
    for shape in args.shapes:
        H, I, num_layers = SHAPES[shape]
        for name in args.dtypes:
            dtype = DTYPES[name]
            layers = [[copy_to_huge_pages((torch.randn(I, H, generator=gen) * H ** -0.5).to(dtype))
                       for _ in range(3)] for _ in range(num_layers)]  # w_gate, w_up, w_down_t
            for T in args.rows:
                x = torch.randn(T, H, generator=gen)
                dense = per_layer_ms(layers, lambda *ws, x=x: dense_ffn(x, *ws, "silu", 0.1),
                                     args.repeats, flush)
                cells = []
                for mode in args.modes:
                    kind, off = mode.split(":")
                    threshold, mask = 0.0, None
                    if kind == "exact":
                        s = F.silu(x @ layers[0][0].float().t()).abs()  # [T, I]
                        threshold = float(s.flatten().kthvalue(max(1, int(float(off) * s.numel())))
                                          .values)
                        union = (s > threshold).any(0).float().mean().item()
                    else:
                        num_on = round((1 - float(off)) * I)
                        mask = torch.zeros(T, I, dtype=torch.bool)
                        for t in range(T):
                            mask[t, torch.randperm(I, generator=gen)[:num_on]] = True
                        union = mask.any(0).float().mean().item()
                    native = per_layer_ms(
                        layers, lambda *ws, x=x, thr=threshold, mask=mask:
                        sparse_ffn_cpu.sparse_ffn_native(x, *ws, "silu", thr, mask),
                        args.repeats, flush)
                    cells.append(f"{mode} union {union:.2f}: {native:7.2f} ({dense / native:4.2f}x)")
                print(f"{shape} {name} rows {T:2d}: dense {dense:7.2f} | " + " | ".join(cells),
                      flush=True)


if __name__ == "__main__":
    main()
