"""CPU sparse FFN: the native copy-free kernel, and a torch-only path when it cannot be built.

Both take the weights as stored (w_gate, w_up, w_down_t all [I, H] contiguous) and need no
layout change at load time. On the CPU a host sync is free, so the torch path may use
`nonzero()`; the native path needs none (it reads the mask itself). Both report the weight rows
they read in `rows_read` (kernels/sparse_ffn.py, docs/SPARSITY.md).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_serve.kernels import cpu_native
from sparse_serve.kernels.activations import ACT_CODES, check_act
from sparse_serve.kernels.int4_rows import is_packed, stored_width
from sparse_serve.kernels.sparse_ffn_ref import RowScales, apply_activation

# uint8: 4-bit rows (kernels/int4_rows.py), int8 values like dtype 3's
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3, torch.uint8: 4}
_QUANTIZED = (torch.int8, torch.uint8)
MAX_NATIVE_BATCH = 64


def _ptr(t: Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def native_supported(x: Tensor, w_gate: Tensor) -> bool:
    return (x.shape[0] <= MAX_NATIVE_BATCH and w_gate.dtype in _DTYPE_CODES
            and cpu_native.available())


def _check_scales(w: Tensor, scale: Tensor | None, name: str, rows: int, width: int, dim: int = 0) -> None:
    """int8 weights need their fp32 scales (one per row: dim 0, or per column: dim 1); float
    weights take none."""
    if w.dtype not in _QUANTIZED:
        assert scale is None, f"{name}: scales given for {w.dtype} weights"
        return
    assert scale is not None, f"{name}: int8 weights need their scales"
    assert (scale.dtype == torch.float32 and scale.shape == (rows if dim == 0 else width,) and scale.is_contiguous()
            and not scale.is_cuda), (name, scale.dtype, scale.shape)


def sparse_ffn_native(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act: str,
                      threshold: float = 0.0, predicted: Tensor | None = None,
                      rows_read: Tensor | None = None,
                      row_scales: RowScales | None = None) -> tuple[Tensor, Tensor]:
    """Copy-free sparse FFN on CPU tensors.

    x [T, H] (any float dtype, T <= 64); w_gate, w_up, w_down_t [I, H] contiguous, one dtype of
    float32 / bfloat16 / float16 / int8 (int8 with row_scales: gate and up [I] per neuron, down
    [H] per hidden channel; kernels/sparse_ffn_ref.py RowScales), or 4-bit rows uint8 [I,
    row_bytes(H)] with the same scales (kernels/int4_rows.py); predicted [T, I] bool or None.
    Returns (out [T, H] in x.dtype, active [T, I] bool). Reads a gate row only for predicted
    neurons (all in exact mode), an up row only where the gate survived for some batch row, and a
    down row only where h != 0; and prefetches some rows ahead of use that may then go unused (the
    kernel's comments say which).
    rows_read (int64 [3], optional) receives the (gate, up, down) rows read or prefetched, as
    the kernel counted them (kernels/csrc/sparse_ffn_cpu.cpp).
    """
    check_act(act)
    lib = cpu_native.load()
    if lib is None:
        raise RuntimeError("native CPU sparse FFN kernel is not available")
    T, H = x.shape
    I = w_gate.shape[0]
    assert not x.is_cuda and x.dim() == 2 and 1 <= T <= MAX_NATIVE_BATCH, x.shape
    width = stored_width(w_gate, H)
    for w in (w_gate, w_up, w_down_t):
        assert w.shape == (I, width) and w.is_contiguous() and w.dtype == w_gate.dtype, (
            w.shape, w.dtype)
    assert w_gate.dtype in _DTYPE_CODES, w_gate.dtype
    scales = row_scales if row_scales is not None else RowScales(None, None, None)
    # down's scales: per hidden channel (dim 1), per neuron for 4-bit rows (kernels/sparse_ffn_ref.py RowScales)
    down_dim = 0 if is_packed(w_down_t) else 1
    for name, w, scale, dim in zip(("gate", "up", "down"), (w_gate, w_up, w_down_t), scales, (0, 0, down_dim)):
        _check_scales(w, scale, name, I, H, dim)
    xf = x.float().contiguous()                       # [T, H]
    pred = None
    if predicted is not None:
        assert predicted.shape == (T, I) and predicted.dtype == torch.bool, predicted.shape
        pred = predicted.contiguous().view(torch.uint8)
    h = torch.empty(T, I, dtype=torch.float32)        # [T, I] scratch, fully written
    active = torch.empty(T, I, dtype=torch.bool)      # [T, I]
    any_active = torch.empty(I, dtype=torch.uint8)    # [I] scratch
    out = torch.empty(T, H, dtype=torch.float32)      # [T, H], zeroed by the kernel
    if rows_read is None:
        rows_read = torch.empty(3, dtype=torch.int64)  # [3], written by the kernel
    assert (rows_read.shape == (3,) and rows_read.dtype == torch.int64 and not rows_read.is_cuda
            and rows_read.is_contiguous()), (rows_read.dtype, rows_read.shape)
    rc = lib.sparse_ffn_cpu(
        _ptr(xf), _ptr(w_gate), _ptr(w_up), _ptr(w_down_t), *map(_ptr, scales[:3]), _ptr(pred), _ptr(h),
        _ptr(active), _ptr(any_active), _ptr(out), _ptr(rows_read), T, H, I, ACT_CODES[act],
        float(threshold), _DTYPE_CODES[w_gate.dtype], scales.x_bits, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native sparse FFN kernel failed with code {rc}")
    return out.to(x.dtype), active


def linear_native(x: Tensor, w: Tensor, scale: Tensor | None = None) -> Tensor:
    """x [T, K] (T <= 64) @ w [N, K].T -> [T, N] float32, reading w once as stored (int8 w
    with its per-row fp32 scale [N])."""
    lib = cpu_native.load()
    if lib is None:
        raise RuntimeError("native CPU kernel is not available")
    T, K = x.shape
    N = w.shape[0]
    assert not x.is_cuda and 1 <= T <= MAX_NATIVE_BATCH, x.shape
    assert w.shape == (N, K) and w.is_contiguous() and w.dtype in _DTYPE_CODES and not is_packed(w), (
        w.shape, w.dtype)   # the predictors' GEMVs: no 4-bit rows
    _check_scales(w, scale, "w", N, K)
    xf = x.float().contiguous()                       # [T, K]
    out = torch.empty(T, N, dtype=torch.float32)      # [T, N], fully written
    rc = lib.linear_cpu(_ptr(xf), _ptr(w), _ptr(scale), _ptr(out), T, K, N, _DTYPE_CODES[w.dtype],
                        torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native linear kernel failed with code {rc}")
    return out


def predict_active_native(x: Tensor, fc1: Tensor, fc2: Tensor, threshold: float = 0.0,
                          scales: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """[T, I] bool, fc2(relu(fc1 x)) > threshold, with both GEMVs in the native kernel (int8
    fc1/fc2 with their per-row scales ([r], [I]) given)."""
    s1, s2 = scales if scales is not None else (None, None)
    z = torch.relu(linear_native(x, fc1, s1))         # [T, r] float32
    return linear_native(z, fc2, s2) > threshold      # [T, I]


def sparse_ffn_torch(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act: str,
                     threshold: float = 0.0, predicted: Tensor | None = None,
                     rows_read: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sparse FFN from stock torch ops (the path used when the native kernel cannot be built).

    Gate/up rows of the union of active neurons are gathered (a copy: only worth it at high
    sparsity); the down projection is copy-free with F.embedding_bag, which sums the active rows
    of w_down_t weighted by h. Rows read (rows_read, int64 [3], optional): predicted mode reads
    the gate, up and down rows of the predicted union; exact mode every gate row, then the up
    and down rows of the neurons whose gate survived for some batch row.
    """
    check_act(act)
    T, H = x.shape
    dtype = w_gate.dtype
    xw = x.to(dtype)
    if predicted is None:
        g_all = F.linear(xw, w_gate)                  # [T, I]
        # Neurons whose gate cannot give h != 0 for any row are skipped (drelu: g <= 0 too).
        zero_u = torch.ones_like(g_all)
        alive = apply_activation(g_all, zero_u, act, threshold) != 0
        idx = alive.any(0).nonzero().squeeze(1)       # [k]
        g = g_all.index_select(1, idx)                # [T, k]
    else:
        idx = predicted.any(0).nonzero().squeeze(1)   # [k]
        g = F.linear(xw, w_gate.index_select(0, idx))  # [T, k]
    if rows_read is not None:
        k = idx.numel()
        rows_read.copy_(torch.tensor([w_gate.shape[0] if predicted is None else k, k, k]))
    if idx.numel() == 0:
        return torch.zeros(T, H, dtype=x.dtype), torch.zeros(T, w_gate.shape[0], dtype=torch.bool)
    u = F.linear(xw, w_up.index_select(0, idx))       # [T, k]
    h_k = apply_activation(g, u, act, threshold)      # [T, k]
    if predicted is not None:
        h_k = torch.where(predicted.index_select(1, idx), h_k, torch.zeros_like(h_k))
    h = torch.zeros(T, w_gate.shape[0], dtype=dtype)  # [T, I]
    h.index_copy_(1, idx, h_k)
    bags = idx.unsqueeze(0).expand(T, -1)             # [T, k]
    out = F.embedding_bag(bags, w_down_t, per_sample_weights=h_k.contiguous(), mode="sum")
    return out.to(x.dtype), h != 0
