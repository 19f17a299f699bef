"""Sparse FFN and activation-predictor entry points: the API the model calls.

Dispatch: CUDA tensors -> Triton kernels (kernels/sparse_ffn_triton.py, imported lazily so
that CPU-only processes never import Triton); CPU tensors -> the native copy-free kernel
(kernels/sparse_ffn_cpu.py), or stock torch ops if it cannot be built. Above
`dense_fallback_fraction` of the batch's (predicted) neurons, the dense path is used instead.

Semantics (kernels/sparse_ffn_ref.py is the definition):
    g = x @ w_gate.T ; u = x @ w_up.T
    silu:    h = where(|silu(g)| > thr, silu(g), 0) * u      (thr 0: plain SwiGLU)
    relu:    h = relu(g) * u
    drelu:   h = relu(g) * relu(u)
    fatrelu: h = where(g > thr, g, 0) * u
    predicted given: h = where(predicted, h, 0)   (unpredicted neurons are never read)
    active = h != 0 ; out = h @ w_down_t
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from kernels import cpu_native, sparse_ffn_cpu
from kernels.sparse_ffn_ref import check_act, dense_ffn, predict_active_ref

logger = logging.getLogger(__name__)

# NOTE: measured crossovers (bench/kernels.py, docs/benchmarks/kernels.md): the fraction of
# neurons the batch reads above which the dense path is used.
# - CPU float32, batch 1: the native kernel reads each active row once but at ~80% of the
#   bandwidth torch's dense GEMV reaches on one full stream (rows are scattered), so it loses
#   near full density: measured 0.82x dense at 100% active, 1.05x at 75%.
# - CPU float32, batch >= 2: torch's small-M SGEMM is 2-4x slower than its GEMV per byte here,
#   while the native kernel reads each row once for the whole batch: it wins at any density.
# - CPU bf16/fp16: torch's 16-bit CPU GEMM (no bf16 units on this class of CPU) is over 10x
#   slower than the native kernel even at full density: never fall back.
# - CUDA: 1.0 (never): the masked row loads read no more bytes than dense at any density, and a
#   fraction below 1 costs a host sync per call (breaking CUDA-graph capture); run
#   bench/gpu_check.sh on a GPU to measure the crossover there.
CPU_FP32_BATCH1_FALLBACK = 0.75
CUDA_DENSE_FALLBACK = 1.0


def default_dense_fallback(device: torch.device, dtype: torch.dtype, num_rows: int) -> float:
    """The measured default crossover for `num_rows` rows of `dtype` weights on `device`."""
    if device.type == "cuda":
        return CUDA_DENSE_FALLBACK
    if dtype == torch.float32 and num_rows == 1:
        return CPU_FP32_BATCH1_FALLBACK
    return 1.0


# Above this many rows (prefill) the GPU path is always dense: the work is compute-bound.
MAX_SPARSE_BATCH = 64
# The gather-based torch CPU path (no compiler) beats dense only below ~20% active neurons.
TORCH_PATH_CROSSOVER = 0.2


def _check_inputs(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor,
                  predicted: Tensor | None) -> None:
    assert x.dim() == 2, f"x must be [T, H], got {tuple(x.shape)}"
    T, H = x.shape
    I = w_gate.shape[0]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        assert w.shape == (I, H), f"{name} must be [I={I}, H={H}], got {tuple(w.shape)}"
        assert w.device == x.device, f"{name} is on {w.device}, x on {x.device}"
    if predicted is not None:
        assert predicted.shape == (T, I) and predicted.dtype == torch.bool, (
            f"predicted must be bool [T={T}, I={I}], got {predicted.dtype} {tuple(predicted.shape)}")


def sparse_ffn(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act: str,
               threshold: float = 0.0, predicted: Tensor | None = None,
               dense_fallback_fraction: float | None = None) -> tuple[Tensor, Tensor]:
    """Gated FFN that reads only the active neurons' weights.

    x [T, H] normed FFN input; w_gate, w_up [I, H] and w_down_t [I, H] (down_proj.weight
    transposed at load time), contiguous; predicted [T, I] bool or None (exact mode).
    Returns (out [T, H] in x.dtype, active [T, I] bool). The batch reads the union of its rows'
    active neurons; each row's own `active` is returned.
    """
    check_act(act)
    _check_inputs(x, w_gate, w_up, w_down_t, predicted)
    T = x.shape[0]
    fallback = (default_dense_fallback(x.device, w_gate.dtype, T) if dense_fallback_fraction is None
                else dense_fallback_fraction)
    if x.is_cuda:
        if T > MAX_SPARSE_BATCH:
            return dense_ffn(x, w_gate, w_up, w_down_t, act, threshold, predicted)
        from kernels import sparse_ffn_triton  # NOTE: lazy, see the module docstring
        return sparse_ffn_triton.sparse_ffn_triton(
            x, w_gate, w_up, w_down_t, act, threshold, predicted, dense_fallback_fraction=fallback)
    return _sparse_ffn_cpu(x, w_gate, w_up, w_down_t, act, threshold, predicted, fallback)


def _sparse_ffn_cpu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act: str,
                    threshold: float, predicted: Tensor | None, fallback: float
                    ) -> tuple[Tensor, Tensor]:
    # NOTE: on the CPU a host read of the mask is free (no device to sync with).
    if fallback < 1.0:
        if predicted is None:
            # Exact mode reads every gate row anyway; plain SwiGLU (silu, threshold 0) activates
            # every neuron, so it is dense by definition.
            if act == "silu" and threshold <= 0.0:
                return dense_ffn(x, w_gate, w_up, w_down_t, act, threshold, predicted)
        elif predicted.any(0).float().mean().item() > fallback:
            return dense_ffn(x, w_gate, w_up, w_down_t, act, threshold, predicted)
    contiguous = all(w.is_contiguous() for w in (w_gate, w_up, w_down_t))
    if contiguous and sparse_ffn_cpu.native_supported(x, w_gate):
        return sparse_ffn_cpu.sparse_ffn_native(x, w_gate, w_up, w_down_t, act, threshold,
                                                predicted)
    # Without the native kernel, the gather-based torch path only wins at high sparsity (it
    # copies the active rows), and in exact mode the sparsity is unknown up front.
    if predicted is None or predicted.any(0).float().mean().item() > TORCH_PATH_CROSSOVER:
        return dense_ffn(x, w_gate, w_up, w_down_t, act, threshold, predicted)
    return sparse_ffn_cpu.sparse_ffn_torch(x, w_gate, w_up, w_down_t, act, threshold, predicted)


def predict_active(x: Tensor, fc1: Tensor, fc2: Tensor, threshold: float = 0.0) -> Tensor:
    """TurboSparse predictor: [T, I] bool, fc2(relu(fc1 x)) > threshold.

    x [T, H] is the residual stream before the post-attention norm; fc1 [r, H]; fc2 [I, r].
    """
    assert x.dim() == 2 and fc1.dim() == 2 and fc2.dim() == 2, (x.shape, fc1.shape, fc2.shape)
    assert fc1.shape[1] == x.shape[1] and fc2.shape[1] == fc1.shape[0], (
        f"fc1 must be [r, H={x.shape[1]}] and fc2 [I, r]; got {tuple(fc1.shape)}, {tuple(fc2.shape)}")
    if x.is_cuda:
        if x.shape[0] > MAX_SPARSE_BATCH:   # prefill: compute-bound, cuBLAS
            return predict_active_ref(x, fc1, fc2, threshold)
        from kernels import predictor_triton
        return predictor_triton.predict_active_triton(x, fc1, fc2, threshold)
    # NOTE: on the CPU the native kernel reads the weights once at full speed for any decode
    # batch, where torch's bf16/fp16 CPU GEMM is over 10x slower and its small-M float32 GEMM
    # 2-4x slower (see DENSE_FALLBACK notes above); the reference is the fallback.
    if (x.shape[0] <= sparse_ffn_cpu.MAX_NATIVE_BATCH
            and fc1.is_contiguous() and fc2.is_contiguous() and cpu_native.available()):
        return sparse_ffn_cpu.predict_active_native(x, fc1, fc2, threshold)
    return predict_active_ref(x, fc1, fc2, threshold)
