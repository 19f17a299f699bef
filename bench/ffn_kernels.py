"""Sparse vs dense FFN layer at Mistral-7B shape (hidden 4096, intermediate 14336).

For each dtype, batch and sparsity: the time of torch's dense FFN (cuBLAS / CPU BLAS in the
weights' dtype) and of `sparse_serve.kernels.sparse_ffn` in predicted mode with its default
dense fallback (the path the engine takes), the speed-up, and the achieved bandwidth on the
bytes the sparse path actually reads (3 rows of H per neuron in the batch's union) against a
measured ceiling (a large device copy, read + write bytes). On CUDA also the FFN from the mask and the
predictor's group counts (the engine's path). With --predictor-rank, the predictor's time, and
predictor + FFN (a predicted layer end to end) against the dense FFN.

Masks are drawn independently per batch row at the given sparsity, so the union a batch reads
grows with the batch (the `union` column); the activation is SwiGLU with threshold 0, so every
predicted neuron fires and the active set equals the predicted set.
Timings are the minimum over repeats, interleaving dense and sparse, which keeps the numbers
usable on a shared machine.

    python bench/ffn_kernels.py --quick                      # a minute or two on a laptop CPU
    python bench/ffn_kernels.py --out docs/benchmarks/kernels.md
    python bench/ffn_kernels.py --device cuda --dtypes bf16  # GPU (see bench/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from sparse_serve.engine.worker.huge_pages import copy_to_huge_pages
from sparse_serve.kernels.sparse_ffn import new_group_counts, predict_active, sparse_ffn
from sparse_serve.kernels.sparse_ffn_ref import dense_ffn, group_counts_ref

# NOTE: the module itself (kernels/__init__.py re-exports a function of the same name).
sparse_ffn_module = importlib.import_module("sparse_serve.kernels.sparse_ffn")

logger = logging.getLogger("sparse_serve.bench.ffn_kernels")
HIDDEN, INTERMEDIATE = 4096, 14336
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def place(w: torch.Tensor, device: str) -> torch.Tensor:
    """Weights where the engine keeps them: on the GPU, or on CPU huge pages (engine/worker/huge_pages.py;
    5-20% faster scattered-row reads than 4 KiB pages here)."""
    return w.to(device) if device != "cpu" else copy_to_huge_pages(w)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


_flush_buffers: dict[str, torch.Tensor] = {}


def flush_cache(device: str) -> None:
    """Evict the last-level cache (CPU L3 / GPU L2) by rewriting a buffer several times its size.

    NOTE: without this, the high-sparsity rows are flattered: at 95% sparsity a layer's active
    bf16 rows (18 MB) fit in a 32 MB L3, and repeating the same call would read them from cache,
    whereas a real model walks 32 layers of different weights between two uses of a layer.
    """
    # NOTE: read-only, so the evicted lines are clean: a write-based flush leaves tens of MB of
    # dirty lines whose write-back would then be charged to the timed call.
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.ones((64 if device == "cpu" else 256) << 18,
                                            dtype=torch.float32, device=device)
    _flush_buffers[device].sum()
    _sync(device)


def time_min(fns: list, repeats: int, device: str) -> list[float]:
    """Minimum time in ms of each fn, calls interleaved round-robin after one warm-up, each call
    timed from a flushed cache: wall time on the CPU, CUDA-event time on a GPU."""
    if device == "cuda":
        return _time_min_cuda(fns, repeats)
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()
    _sync(device)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            flush_cache(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[k] = min(best[k], (time.perf_counter() - start) * 1e3)
    return best


def cuda_graph(fn):
    """fn captured in a CUDA graph (after two warm-up calls, which also compile): returns the
    replay. The sparse path is sync-free by design, and so capturable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _time_min_cuda(fns: list, repeats: int) -> list[float]:
    """GPU time between CUDA events around each call, each call a CUDA-graph replay.

    NOTE: replaying a graph is how a server runs decode (vLLM captures it): Python's launch
    overhead, ~10-20 us per Triton launch, would otherwise dominate a ~20 us sparse call and time
    the host rather than the kernels.
    """
    fns = [cuda_graph(fn) for fn in fns]
    torch.cuda.synchronize()
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(repeats)] for _ in fns]
    for r in range(repeats):
        for k, fn in enumerate(fns):
            _flush_buffers["cuda"].sum()
            start, end = events[k][r]
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize()
    return [min(start.elapsed_time(end) for start, end in per_fn) for per_fn in events]


def copy_bandwidth(device: str, num_bytes: int, repeats: int) -> float:
    """GB/s of a large device copy, counting read + write bytes."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    (ms,) = time_min([lambda: dst.copy_(src)], repeats, device)
    return 2 * num_bytes / ms / 1e6


def random_masks(T: int, sparsity: float, gen: torch.Generator, device: str,
                 I: int = INTERMEDIATE) -> torch.Tensor:
    num_active = round((1.0 - sparsity) * I)
    scores = torch.rand(T, I, generator=gen)
    mask = torch.zeros(T, I, dtype=torch.bool)
    mask.scatter_(1, scores.topk(num_active, dim=1).indices, True) if num_active else None
    return mask.to(device)


def dispatch_path(call) -> str:
    """"dense" or "sparse": which path `sparse_serve.kernels.sparse_ffn` takes for this call,
    observed (its dense branch calls the module's `dense_ffn`), so the table follows the
    dispatch rules."""
    real, taken = sparse_ffn_module.dense_ffn, []

    def spy(*args, **kwargs):
        taken.append(True)
        return real(*args, **kwargs)

    sparse_ffn_module.dense_ffn = spy
    try:
        call()
    finally:
        sparse_ffn_module.dense_ffn = real
    return "dense" if taken else "sparse"


def exact_threshold(x: torch.Tensor, w_gate: torch.Tensor, sparsity: float) -> float:
    """Exact mode: the fatrelu threshold at which `sparsity` of this batch's gate values are
    at or under it (the model's own gate decides; no predictor)."""
    g = (x.float() @ w_gate.float().t()).flatten()
    return float(torch.quantile(g, sparsity).item()) if sparsity > 0 else float(g.min().item()) - 1.0


def exact_union(x: torch.Tensor, w_gate: torch.Tensor, threshold: float) -> float:
    return ((x.float() @ w_gate.float().t()) > threshold).any(0).float().mean().item()


def run(args: argparse.Namespace) -> list[dict]:
    device = args.device
    gen = torch.Generator().manual_seed(0)
    flush_cache(device)  # allocates the flush buffer
    ceiling = copy_bandwidth(device, args.copy_mb << 20, args.repeats)
    logger.info("memory-bandwidth ceiling (copy, read+write): %.1f GB/s", ceiling)
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        scale = HIDDEN ** -0.5
        weights = [place((torch.randn(INTERMEDIATE, HIDDEN, generator=gen) * scale).to(dtype),
                         device) for _ in range(3)]  # w_gate, w_up, w_down_t: [I, H] each
        elsize = weights[0].element_size()
        for T in args.batches:
            x = torch.randn(T, HIDDEN, generator=gen).to(dtype).to(device)
            (dense_ms,) = time_min([lambda: dense_ffn(x, *weights, "silu")], args.dense_repeats,
                                   device)
            dense_gbs = 3 * INTERMEDIATE * HIDDEN * elsize / dense_ms / 1e6
            for sparsity in args.sparsities:
                if args.mode == "exact":
                    act, threshold, mask = "fatrelu", exact_threshold(x, weights[0], sparsity), None
                    union = exact_union(x, weights[0], threshold)
                    # every gate row, then up and down rows of the neurons that fired
                    read = (1 + 2 * union) * INTERMEDIATE * HIDDEN * elsize
                else:
                    act, threshold = "silu", 0.0
                    mask = random_masks(T, sparsity, gen, device)
                    union = mask.any(0).float().mean().item()
                    read = union * 3 * INTERMEDIATE * HIDDEN * elsize
                # On CUDA the engine hands the FFN the predictor's per-group counts along with
                # the mask (the kernels then skip their compaction launch): counted here outside
                # the timed call, as the predictor's epilogue does (its cost: run_predictor).
                counts = (group_counts_ref(mask) if mask is not None and device == "cuda"
                          and T <= sparse_ffn_module.CUDA_SPARSE_MAX_ROWS else None)
                path = dispatch_path(lambda: sparse_ffn(x, *weights, act, threshold,
                                                        predicted=mask,
                                                        predicted_group_counts=counts))
                # The sparse kernel from the mask alone (fallback off), from the mask and the
                # counts, and where it differs, the dispatcher.
                calls = [lambda: sparse_ffn(x, *weights, act, threshold, predicted=mask,
                                            dense_fallback_fraction=1.0)]
                if counts is not None:
                    calls.append(lambda: sparse_ffn(x, *weights, act, threshold, predicted=mask,
                                                    dense_fallback_fraction=1.0,
                                                    predicted_group_counts=counts))
                if path == "dense":
                    calls.append(lambda: sparse_ffn(x, *weights, act, threshold, predicted=mask,
                                                    predicted_group_counts=counts))
                times = time_min(calls, args.repeats, device)
                kernel_ms, sparse_ms = times[0], times[-1]
                counted_ms = times[1] if counts is not None else None
                row = dict(device=device, dtype=name, batch=T, sparsity=sparsity, union=union,
                           dense_ms=dense_ms, kernel_ms=kernel_ms, counted_ms=counted_ms,
                           sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms, dense_gbs=dense_gbs,
                           sparse_gbs=read / kernel_ms / 1e6, ceiling=ceiling, path=path,
                           counted_gbs=read / counted_ms / 1e6 if counted_ms else None)
                rows.append(row)
                counted = (f"  from counts {counted_ms:8.3f} ms {row['counted_gbs']:5.1f} GB/s "
                           f"({100 * row['counted_gbs'] / ceiling:3.0f}%)" if counted_ms else "")
                logger.info("%s %s T=%-2d sparsity=%3.0f%% union=%5.1f%% dense %8.3f ms "
                            "kernel %8.3f ms (%5.1f GB/s, %3.0f%% of ceiling)%s  dispatch (%s) "
                            "%8.3f ms  %5.2fx", device, name, T, sparsity * 100, union * 100,
                            dense_ms, kernel_ms, row["sparse_gbs"],
                            100 * row["sparse_gbs"] / ceiling, counted, path, sparse_ms,
                            row["speedup"])
    return rows


def run_predictor(args: argparse.Namespace) -> list[dict]:
    """Time of the TurboSparse predictor (fc1 [r, H], fc2 [I, r]) next to the dense FFN: the
    predictor reads every one of its weights, so at high sparsity its bytes rival the FFN's."""
    device, rank = args.device, args.predictor_rank
    gen = torch.Generator().manual_seed(1)
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        fc1 = place((torch.randn(rank, HIDDEN, generator=gen) * HIDDEN ** -0.5).to(dtype), device)
        fc2 = place((torch.randn(INTERMEDIATE, rank, generator=gen) * rank ** -0.5).to(dtype), device)
        counts = new_group_counts(INTERMEDIATE, device)
        for T in args.batches:
            x = torch.randn(T, HIDDEN, generator=gen).to(dtype).to(device)
            calls = [lambda: predict_active(x, fc1, fc2)]
            if device == "cuda":   # (only the CUDA engine asks for the counts)
                calls.append(lambda: predict_active(x, fc1, fc2, group_counts=counts))
            times = time_min(calls, args.repeats, device)
            ms, counting_ms = times[0], times[1] if len(times) > 1 else None
            read = (fc1.numel() + fc2.numel()) * fc1.element_size()
            rows.append(dict(dtype=name, batch=T, rank=rank, ms=ms, gbs=read / ms / 1e6,
                             counting_ms=counting_ms))
            logger.info("predictor %s T=%-2d rank %d: %.3f ms, %.1f GB/s%s", name, T, rank, ms,
                        read / ms / 1e6,
                        f"; counting groups {counting_ms:.3f} ms" if counting_ms else "")
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# Sparse FFN kernel benchmark",
        "",
        f"- Machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `python bench/ffn_kernels.py {' '.join(sys.argv[1:])}`",
        f"- Layer: Mistral-7B FFN, hidden {HIDDEN}, intermediate {INTERMEDIATE}; "
        + ("predicted mode, per-row random masks (SwiGLU, every predicted neuron fires)"
           if args.mode == "predicted" else
           "exact mode (no predictor): fatrelu with the threshold at the target quantile of "
           "the batch's gate values")
        + "; `union` = fraction of neurons the batch reads.",
        f"- Bandwidth ceiling (large copy, read + write): {rows[0]['ceiling']:.1f} GB/s. "
        "`kernel` = the sparse kernel from the mask alone, dense fallback off; `kernel GB/s` = "
        "bytes it reads (" + ("union x 3 rows" if args.mode == "predicted" else
                              "every gate row + union x (up, down) rows") + ") / time. "
        "`from counts` = the same from the mask and the predictor's per-group counts (CUDA, "
        "predicted mode: no compaction launch). `dispatch` = `sparse_ffn` with its default "
        "fallback, and on CUDA the counts (what the engine runs); `speed-up` = dense / dispatch.",
        "- Times are the minimum over repeats (dense and sparse interleaved), each call after "
        "evicting the last-level cache" + ("; GPU times are CUDA-event times of a CUDA-graph replay "
        "of the call (as a server runs decode; Python's launch overhead excluded)."
        if args.device == "cuda" else "."),
        "",
        "| device | dtype | batch | sparsity | union | dense ms | kernel ms | kernel GB/s | "
        "% ceiling | from counts ms | from counts % ceiling | dispatch path | dispatch ms | "
        "speed-up vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        counted = (f"{r['counted_ms']:.4f} | {100 * r['counted_gbs'] / r['ceiling']:.0f}%"
                   if r["counted_ms"] else "- | -")
        lines.append(
            f"| {r['device']} | {r['dtype']} | {r['batch']} | {r['sparsity']:.0%} | "
            f"{r['union']:.1%} | {r['dense_ms']:.3f} | {r['kernel_ms']:.4f} | "
            f"{r['sparse_gbs']:.1f} | {100 * r['sparse_gbs'] / r['ceiling']:.0f}% | {counted} | "
            f"{r['path']} | {r['sparse_ms']:.4f} | {r['speedup']:.2f}x |")
    if args.predictor_rows:
        lines += ["", f"Predictor (`predict_active`, fc1 [{args.predictor_rank}, {HIDDEN}], fc2 "
                  f"[{INTERMEDIATE}, {args.predictor_rank}], every weight read), and the same "
                  "counting its neurons per group for the FFN (`group_counts=`):", "",
                  "| dtype | batch | ms | GB/s | ms, counting groups |", "|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['batch']} | {r['ms']:.4f} | {r['gbs']:.1f} | "
                  + (f"{r['counting_ms']:.4f} |" if r["counting_ms"] else "- |")
                  for r in args.predictor_rows]
        lines += end_to_end(rows, args.predictor_rows)
    return "\n".join(lines) + "\n"


def end_to_end(rows: list[dict], predictor_rows: list[dict]) -> list[str]:
    """Markdown: the predicted-mode layer as the engine runs it, predictor (counting groups
    where it does) + FFN (dispatch), against the dense FFN (no predictor), per batch and
    sparsity."""
    counts = sparse_ffn_module.CUDA_SPARSE_MAX_ROWS   # (the rows the engine counts groups at)
    predictor = {(r["dtype"], r["batch"]): (r["counting_ms"] if r["counting_ms"]
                                            and r["batch"] <= counts else r["ms"])
                 for r in predictor_rows}
    lines = ["", "Predictor + FFN, as the engine runs a predicted layer, against the dense FFN "
             "(the sum of the two calls timed apart; `bench/predicted_layer.py` times them as "
             "one):",
             "", "| dtype | batch | sparsity | predictor ms | FFN ms | total ms | dense ms | "
             "speed-up |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pred_ms = predictor.get((r["dtype"], r["batch"]))
        if pred_ms is not None:
            total = pred_ms + r["sparse_ms"]
            lines.append(f"| {r['dtype']} | {r['batch']} | {r['sparsity']:.0%} | {pred_ms:.4f} | "
                         f"{r['sparse_ms']:.4f} | {total:.4f} | {r['dense_ms']:.3f} | "
                         f"{r['dense_ms'] / total:.2f}x |")
    return lines


def write_report(path: Path, text: str) -> None:
    """A markdown report to `path` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    logger.info("wrote %s", path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-repeats", type=int, default=3)
    parser.add_argument("--copy-mb", type=int, default=1024)
    parser.add_argument("--quick", action="store_true",
                        help="batch 1 and 4, sparsity 0/50/90%%, fewer repeats")
    parser.add_argument("--mode", choices=["predicted", "exact"], default="predicted",
                        help="predicted: random masks given; exact: no predictor, fatrelu "
                             "thresholds set for the target sparsity (every gate row is read)")
    parser.add_argument("--predictor-rank", type=int, default=0,
                        help="also time the predictor at this rank (TurboSparse: ~1000)")
    parser.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    parser.add_argument("--configs", type=Path, default=None,
                        help="JSON of tuned Triton tiles (bench/tune_triton_ffn.py --json)")
    args = parser.parse_args(argv)
    if args.configs is not None:
        from sparse_serve.bench.tune_triton_ffn import load_tuned
        load_tuned(args.configs)
    if args.dtypes is None:
        args.dtypes = ["bf16"] if args.device == "cuda" else ["fp32", "bf16"]
    if args.quick:
        args.batches = [b for b in args.batches if b <= 4]
        args.sparsities = [s for s in args.sparsities if s in (0.0, 0.5, 0.9)]
        args.repeats, args.dense_repeats, args.copy_mb = 3, 2, 256
    if args.device == "cuda":
        args.repeats, args.dense_repeats = max(args.repeats, 20), max(args.dense_repeats, 20)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = run(args)
    args.predictor_rows = run_predictor(args) if args.predictor_rank else []
    if args.out is not None:
        write_report(args.out, markdown(rows, args))


if __name__ == "__main__":
    main()
