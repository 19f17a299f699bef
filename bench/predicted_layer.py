"""A predicted FFN layer as the CUDA engine runs it, timed as one call: predictor, then FFN.

bench/ffn_kernels.py times the predictor and the FFN apart (each from a flushed cache) and adds them
up; here the two run as one replay, as a decode step runs them, so the time also holds what
neither shows alone (the gaps between their launches, the FFN waiting for the predictor's mask,
and whatever one leaves in L2 for the other). For each batch and sparsity, at Mistral-7B shape
with a rank-r predictor (random weights, its threshold set at the sparsity's quantile of the
batch's logits): the dense FFN (cuBLAS), and predictor + FFN, each one CUDA-graph replay from a
flushed cache. The FFN runs the engine's path (the mask and the predictor's group counts) on the
tuned tiles, or those of --configs.

    python bench/predicted_layer.py --configs tuned.json --out docs/benchmarks/predicted_layer.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path

import torch

from sparse_serve.bench.ffn_kernels import HIDDEN, INTERMEDIATE, flush_cache, time_min, write_report
from sparse_serve.kernels import predictor_triton
from sparse_serve.kernels.sparse_ffn import new_group_counts, sparse_ffn
from sparse_serve.kernels.sparse_ffn_ref import dense_ffn

logger = logging.getLogger("sparse_serve.bench.predicted_layer")


def logit_threshold(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
                    sparsity: float) -> float:
    """The predictor threshold that leaves `sparsity` of the batch's (row, neuron) logits
    below it: each row then predicts about 1 - sparsity of the neurons."""
    logits = torch.relu(x.float() @ fc1.float().t()) @ fc2.float().t()          # [T, I]
    return torch.quantile(logits.flatten(), sparsity).item()


def layer_call(x, fc1, fc2, ffn_weights, counts, threshold: float):
    """The predicted layer as SparseMLP runs it on CUDA: predictor (counting groups), then the
    FFN from the mask and the counts."""
    def call():
        pred = predictor_triton.predict_active_triton(x, fc1, fc2, threshold,
                                                      group_counts=counts)
        return sparse_ffn(x, *ffn_weights, "silu", 0.0, predicted=pred,
                          predicted_group_counts=counts)
    return call


def run(args: argparse.Namespace) -> list[dict]:
    device = args.device
    gen = torch.Generator().manual_seed(2)
    dtype = dict(dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    H, I = args.hidden, args.intermediate
    ffn_weights = tuple((torch.randn(I, H, generator=gen) * H ** -0.5).to(**dtype)
                        for _ in range(3))                           # w_gate, w_up, w_down_t
    fc1 = (torch.randn(args.rank, H, generator=gen) * H ** -0.5).to(**dtype)
    fc2 = (torch.randn(I, args.rank, generator=gen) * args.rank ** -0.5).to(**dtype)
    counts = new_group_counts(I, torch.device(device))
    flush_cache(device)
    rows = []
    for T in args.batches:
        x = torch.randn(T, H, generator=gen).to(**dtype)
        (dense_ms,) = time_min([lambda: dense_ffn(x, *ffn_weights, "silu")], args.repeats, device)
        for sparsity in args.sparsities:
            threshold = logit_threshold(x, fc1, fc2, sparsity)
            union = predictor_triton.predict_active_triton(
                x, fc1, fc2, threshold).any(0).float().mean().item()
            (layer_ms,) = time_min([layer_call(x, fc1, fc2, ffn_weights, counts, threshold)],
                                   args.repeats, device)
            rows.append(dict(batch=T, sparsity=sparsity, union=union, dense_ms=dense_ms,
                             layer_ms=layer_ms))
            logger.info("T=%-2d sparsity %3.0f%% union %5.1f%%: dense %.4f ms, predictor + FFN "
                        "%.4f ms (%.2fx)", T, 100 * sparsity, 100 * union, dense_ms, layer_ms,
                        dense_ms / layer_ms)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Predicted FFN layer: predictor + FFN as one call",
        "",
        f"- Device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, "
        f"torch {torch.__version__}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `python bench/predicted_layer.py {' '.join(sys.argv[1:])}`",
        f"- FFN {args.hidden} x {args.intermediate}, bf16 (fp32 on the CPU), predictor rank "
        f"{args.rank} with its threshold at the sparsity's quantile of the batch's logits; "
        "`union` = neurons the batch reads. Each time is the minimum over repeats of a "
        "CUDA-graph replay from a flushed cache; `speed-up` = dense / predictor + FFN.",
        "",
        "| batch | sparsity | union | dense ms | predictor + FFN ms | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['sparsity']:.0%} | {r['union']:.1%} | "
                     f"{r['dense_ms']:.4f} | {r['layer_ms']:.4f} | "
                     f"{r['dense_ms'] / r['layer_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    parser.add_argument("--rank", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=HIDDEN)                # Mistral-7B
    parser.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--configs", type=Path, default=None,
                        help="JSON of tuned Triton tiles (bench/tune_triton_ffn.py --json)")
    parser.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    # (cpu: the Triton interpreter, for the tests, not for timing)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.configs is not None:
        from sparse_serve.bench.tune_triton_ffn import load_tuned
        load_tuned(args.configs)
    rows = run(args)
    if args.out is not None:
        write_report(args.out, markdown(rows, args))


if __name__ == "__main__":
    main()
