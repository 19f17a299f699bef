"""Sparse FFN and activation-predictor entry points: the API the model calls.

Dispatch: CUDA tensors -> Triton kernels (kernels/sparse_ffn_triton.py, imported lazily so
that CPU-only processes never import Triton); CPU tensors -> the native copy-free kernel
(kernels/sparse_ffn_cpu.py), or stock torch ops if it cannot be built. Above
`dense_fallback_fraction` of the batch's (predicted) neurons, the dense path is used instead
(on the CPU: of the batch's predicted (row, neuron) pairs; see the NOTE on the defaults and
docs/benchmarks/kernels.md#dispatch-thresholds).

Semantics (kernels/sparse_ffn_ref.py is the definition):
    g = x @ w_gate.T ; u = x @ w_up.T
    silu:    h = where(|silu(g)| > thr, silu(g), 0) * u      (thr 0: plain SwiGLU)
    relu:    h = relu(g) * u
    drelu:   h = relu(g) * relu(u)
    fatrelu: h = where(g > thr, g, 0) * u
    predicted given: h = where(predicted, h, 0)   (unpredicted neurons are never read)
    active = h != 0 ; out = h @ w_down_t

Rows read: given `rows_read` (int64 [3] on x's device), the path that ran writes into it the
gate, up and down rows it read (`hidden` parameters each), on the device, without a host sync:
dense fallback all I of each; predicted mode at least the predicted union's gate rows; exact
mode every gate row; up and down rows only where the path's own test let them through. Which
rows each path reads, and why a prefetch counts: docs/SPARSITY.md#rows-read-by-each-path.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from sparse_serve.kernels import cpu_native, dispatch, sparse_ffn_cpu
from sparse_serve.kernels.activations import check_act
from sparse_serve.kernels.int4_rows import stored_width
from sparse_serve.kernels.sparse_ffn_ref import (
    RowScales,
    dense_ffn,
    group_counts_ref,
    predict_active_ref,
    prediction_groups,
)

logger = logging.getLogger(__name__)

# NOTE: the dense path takes a call where it measured faster; the rules are below, the numbers
# in docs/benchmarks/kernels.md#dispatch-thresholds (bench/cpu_crossover.py, bench/gpu_check.sh).
# CPU float32 is compute-bound from some rows on (MKL's SGEMM then out-computes the kernel), so
# dense above a fraction of the batch's (row, neuron) products; CPU bf16/fp16 never (torch's
# 16-bit CPU GEMM is far slower). hidden size -> (rows from which CPU float32 is compute-bound,
# dense fallback fraction there); the entry with the largest hidden size <= the layer's applies.
CPU_FP32_COMPUTE_BOUND: dict[int, tuple[int, float]] = {0: (12, 0.4), 2048: (32, 0.6)}
# CUDA: never by fraction (reading the mask's density is a host sync, breaking CUDA-graph capture);
# above CUDA_SPARSE_MAX_ROWS rows cuBLAS instead (at 16 rows it won at every measured sparsity).
CUDA_DENSE_FALLBACK = 1.0
CUDA_SPARSE_MAX_ROWS = 8


def default_dense_fallback(device: torch.device, dtype: torch.dtype, num_rows: int,
                           hidden_size: int = 0) -> float:
    """The measured default crossover for `num_rows` rows of `dtype` weights of a layer with
    `hidden_size` inputs on `device`."""
    if device.type == "cuda":
        return CUDA_DENSE_FALLBACK
    widest = max(h for h in CPU_FP32_COMPUTE_BOUND if h <= hidden_size)
    rows, fraction = CPU_FP32_COMPUTE_BOUND[widest]
    if dtype == torch.float32 and num_rows >= rows:
        return fraction
    return 1.0


# Above this many rows (prefill) the GPU predictor is cuBLAS: the work is compute-bound.
MAX_SPARSE_BATCH = 64
# The gather-based torch CPU path (no compiler) beats dense only below ~20% active neurons.
TORCH_PATH_CROSSOVER = 0.2


def _check_inputs(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor,
                  predicted: Tensor | None) -> None:
    assert x.dim() == 2, f"x must be [T, H], got {tuple(x.shape)}"
    T, H = x.shape
    I = w_gate.shape[0]
    width = stored_width(w_gate, H)   # 4-bit rows: kernels/int4_rows.py
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        assert w.shape == (I, width), f"{name} must be [I={I}, {width}], got {tuple(w.shape)}"
        assert w.device == x.device, f"{name} is on {w.device}, x on {x.device}"
    if predicted is not None:
        assert predicted.shape == (T, I) and predicted.dtype == torch.bool, (
            f"predicted must be bool [T={T}, I={I}], got {predicted.dtype} {tuple(predicted.shape)}")


def sparse_ffn(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act: str,
               threshold: float = 0.0, predicted: Tensor | None = None,
               dense_fallback_fraction: float | None = None,
               predicted_group_counts: Tensor | None = None,
               rows_read: Tensor | None = None,
               row_scales: RowScales | None = None) -> tuple[Tensor, Tensor]:
    """Gated FFN that reads only the active neurons' weights.

    x [T, H] normed FFN input; w_gate, w_up [I, H] and w_down_t [I, H] (down_proj.weight
    transposed at load time), contiguous; predicted [T, I] bool or None (exact mode).
    predicted_group_counts: what predict_active(group_counts=...) filled for `predicted`; the
    CUDA kernels then skip their compaction launch (the other paths have no use for it).
    Returns (out [T, H] in x.dtype, active [T, I] bool). The batch reads the union of its rows'
    active neurons; each row's own `active` is returned. rows_read: see the module docstring.
    row_scales: the per-row fp32 scales of int8 weights (CPU only): the native
    kernel reads the int8 rows, in chunks of its maximum batch (64 rows of x) for a prefill.
    """
    check_act(act)
    _check_inputs(x, w_gate, w_up, w_down_t, predicted)
    if rows_read is not None:
        assert (rows_read.shape == (3,) and rows_read.dtype == torch.int64
                and rows_read.device == x.device), (
            f"rows_read must be int64 [3] on {x.device}, got {rows_read.dtype} "
            f"{tuple(rows_read.shape)} on {rows_read.device}")
    T, H = x.shape
    fallback = (default_dense_fallback(x.device, w_gate.dtype, T, H)
                if dense_fallback_fraction is None else dense_fallback_fraction)
    if row_scales is not None:
        return _sparse_ffn_int8_cpu(x, w_gate, w_up, w_down_t, act, threshold, predicted, fallback,
                                    rows_read, row_scales)
    if dispatch.runs_triton(x):
        if T > CUDA_SPARSE_MAX_ROWS:
            return dense_ffn(x, w_gate, w_up, w_down_t, act, threshold, predicted, rows_read)
        from sparse_serve.kernels import sparse_ffn_triton  # NOTE: lazy, see the module docstring
        return sparse_ffn_triton.sparse_ffn_triton(
            x, w_gate, w_up, w_down_t, act, threshold, predicted, dense_fallback_fraction=fallback,
            predicted_group_counts=predicted_group_counts, rows_read=rows_read)
    return _sparse_ffn_cpu(x, w_gate, w_up, w_down_t, act, threshold, predicted, fallback,
                           rows_read)


def _sparse_ffn_cpu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act: str,
                    threshold: float, predicted: Tensor | None, fallback: float,
                    rows_read: Tensor | None) -> tuple[Tensor, Tensor]:
    # NOTE: on the CPU a host read of the mask is free (no device to sync with).
    if fallback < 1.0:
        # The share of (row, neuron) products the native kernel computes; exact mode computes
        # every gate product before it knows which neurons fire.
        density = 1.0 if predicted is None else predicted.float().mean().item()
        if density > fallback:
            return dense_ffn(x, w_gate, w_up, w_down_t, act, threshold, predicted, rows_read)
    contiguous = all(w.is_contiguous() for w in (w_gate, w_up, w_down_t))
    if contiguous and sparse_ffn_cpu.native_supported(x, w_gate):
        return sparse_ffn_cpu.sparse_ffn_native(x, w_gate, w_up, w_down_t, act, threshold,
                                                predicted, rows_read)
    # Without the native kernel, the gather-based torch path only wins at high sparsity (it
    # copies the active rows), and in exact mode the sparsity is unknown up front.
    if predicted is None or predicted.any(0).float().mean().item() > TORCH_PATH_CROSSOVER:
        return dense_ffn(x, w_gate, w_up, w_down_t, act, threshold, predicted, rows_read)
    return sparse_ffn_cpu.sparse_ffn_torch(x, w_gate, w_up, w_down_t, act, threshold, predicted,
                                           rows_read)


def _sparse_ffn_int8_cpu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act: str,
                         threshold: float, predicted: Tensor | None, fallback: float,
                         rows_read: Tensor | None, row_scales: RowScales) -> tuple[Tensor, Tensor]:
    """int8 weights: the native kernel (there is no int8 BLAS to fall back to), a prefill in
    chunks of MAX_NATIVE_BATCH rows of x (each chunk reads its own union of rows, counted);
    the dequantizing reference where the kernel cannot run or a dense fallback is asked for."""
    if x.is_cuda:
        raise ValueError("int8 FFN weights run on the CPU only")
    if fallback < 1.0 or not cpu_native.available():
        return dense_ffn(x, w_gate, w_up, w_down_t, act, threshold, predicted, rows_read, row_scales)
    chunk = sparse_ffn_cpu.MAX_NATIVE_BATCH
    if x.shape[0] <= chunk:
        return sparse_ffn_cpu.sparse_ffn_native(x, w_gate, w_up, w_down_t, act, threshold, predicted,
                                                rows_read, row_scales)
    outs, actives = [], []
    chunk_read = torch.empty(3, dtype=torch.int64)                        # [3] per chunk
    if rows_read is not None:
        rows_read.zero_()
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        out, active = sparse_ffn_cpu.sparse_ffn_native(
            x[rows], w_gate, w_up, w_down_t, act, threshold,
            None if predicted is None else predicted[rows], chunk_read, row_scales)
        outs.append(out)
        actives.append(active)
        if rows_read is not None:
            rows_read += chunk_read
    return torch.cat(outs), torch.cat(actives)


def new_group_counts(num_neurons: int, device: torch.device) -> Tensor:
    """An (uninitialised) buffer for predict_active(group_counts=...) of a layer's neurons."""
    return torch.empty(prediction_groups(num_neurons)[1], dtype=torch.int32, device=device)


def group_counts_for(x: Tensor, num_neurons: int) -> Tensor | None:
    """A buffer for the predictor's group counts where sparse_ffn uses them (the Triton kernels:
    CUDA, up to CUDA_SPARSE_MAX_ROWS rows of x [T, H]), else None (nothing to count)."""
    if dispatch.runs_triton(x) and x.shape[0] <= CUDA_SPARSE_MAX_ROWS:
        return new_group_counts(num_neurons, x.device)
    return None


def predict_active(x: Tensor, fc1: Tensor, fc2: Tensor, threshold: float = 0.0,
                   group_counts: Tensor | None = None,
                   scales: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """TurboSparse predictor: [T, I] bool, fc2(relu(fc1 x)) > threshold.

    x [T, H] is the residual stream before the post-attention norm; fc1 [r, H]; fc2 [I, r].
    group_counts (new_group_counts(I, x.device)), if given, is filled with the number of
    neurons some row predicts in each group of prediction_groups(I) (group_counts_ref): the
    CUDA kernel counts them as it writes the mask, and sparse_ffn(predicted_group_counts=...)
    then skips a launch. scales: the per-row fp32 scales ([r], [I]) of int8 fc1/fc2.
    """
    assert x.dim() == 2 and fc1.dim() == 2 and fc2.dim() == 2, (x.shape, fc1.shape, fc2.shape)
    assert fc1.shape[1] == x.shape[1] and fc2.shape[1] == fc1.shape[0], (
        f"fc1 must be [r, H={x.shape[1]}] and fc2 [I, r]; got {tuple(fc1.shape)}, {tuple(fc2.shape)}")
    if dispatch.runs_triton(x) and x.shape[0] <= MAX_SPARSE_BATCH:
        from sparse_serve.kernels import predictor_triton
        return predictor_triton.predict_active_triton(x, fc1, fc2, threshold,
                                                      group_counts=group_counts, scales=scales)
    predicted = _predict_active_no_triton(x, fc1, fc2, threshold, scales)
    if group_counts is not None:
        group_counts.copy_(group_counts_ref(predicted))
    return predicted


def _predict_active_no_triton(x: Tensor, fc1: Tensor, fc2: Tensor, threshold: float,
                              scales: tuple[Tensor, Tensor] | None) -> Tensor:
    if x.is_cuda:   # prefill: compute-bound, cuBLAS (int8 weights dequantized first)
        return predict_active_ref(x, fc1, fc2, threshold, scales)
    # NOTE: on the CPU the native kernel reads the weights once at full speed for any decode
    # batch, where torch's 16-bit and small-M float32 GEMMs are slower
    # (docs/benchmarks/kernels.md#dispatch-thresholds); the reference is the fallback.
    if (x.shape[0] <= sparse_ffn_cpu.MAX_NATIVE_BATCH
            and fc1.is_contiguous() and fc2.is_contiguous() and cpu_native.available()):
        return sparse_ffn_cpu.predict_active_native(x, fc1, fc2, threshold, scales)
    return predict_active_ref(x, fc1, fc2, threshold, scales)
