"""Triton sparse FFN for decode (batch 1..64), no host sync: the launcher, and exact mode's
masked kernels.

Predicted mode (a mask is given) runs the compacted kernels of kernels/ffn_triton_compact.py.
Exact mode (no predictor: every gate row must be read to know which neurons fire) runs
  - below DOT_MIN_ROWS rows, the compacted kernels after a dense pass over the gate rows that
    makes the mask;
  - from DOT_MIN_ROWS rows, the masked kernels below: at low sparsity the compacted kernels'
    extra passes cost more than they save.
  Each was the faster there on an H100: docs/benchmarks/kernels_gpu_exact.md#which-kernels-run.
The masked kernels:
  _gate_up_kernel  grid (cdiv(I, BLOCK_I),): each program owns BLOCK_I neurons. It reads their
      gate rows, applies the activation, reads an up row only where the gate survived for some
      batch row (masked loads of whole rows: a dead neuron's up row is never fetched), and
      writes h [T, I] float32, active [T, I] and UP_READ [I] (1 where it loaded the up row).
  _down_kernel     grid (cdiv(H, BLOCK_H), SPLIT_I): each program accumulates h @ w_down_t over
      one slice of neurons for one slice of the hidden dimension, reading a w_down_t row slice
      only if that neuron is active in some batch row; partial sums [SPLIT_I, T, H] are reduced
      by one torch sum (deterministic, no atomics).
Batch rows are padded to BLOCK_T >= 16 so that tl.dot applies.
Rows read (rows_read): every gate row; the up rows UP_READ flags; the down rows of the neurons
active in some batch row (the down kernel's own load predicate, h != 0, is `active`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_serve.kernels.activations import ACT_CODES, check_act
from sparse_serve.kernels.ffn_triton_compact import CompactConfig, ffn_compact
from sparse_serve.kernels.sparse_ffn_ref import check_group_counts
from sparse_serve.kernels.triton_utils import (
    DOT_MIN_ROWS,
    activate_gate,
    check_device,
    dot_in_fp32,
    linear_tile,
    next_pow2,
)

# the masked kernels' tiles (measured on an H100: docs/benchmarks/kernels_gpu_exact.md)
MASKED_BLOCK_I = 32
MASKED_BLOCK_H = 128


@triton.jit
def _gate_up_kernel(
    X, WG, WU, H_OUT, ACTIVE, UP_READ,
    T, H, I, threshold,
    stride_xt, stride_xh,
    stride_wi, stride_wh,
    stride_ot, stride_oi,
    ACT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_t = offs_t < T
    mask_i = offs_i < I
    mask_ti = mask_t[:, None] & mask_i[None, :]
    acc_g = linear_tile(X, WG, offs_i, mask_i, T, H, stride_xt, stride_xh, stride_wi, stride_wh,
                        True, DOT_FP32, BLOCK_T, BLOCK_I, BLOCK_H)            # [BT, BI]
    a = activate_gate(acc_g, threshold, ACT)
    alive = mask_ti & (a != 0.0)                                              # [BT, BI]
    need_up = tl.max(alive.to(tl.int32), axis=0) > 0                         # [BI]
    # masked loads of whole rows: a dead neuron's up row is never fetched
    acc_u = linear_tile(X, WU, offs_i, need_up, T, H, stride_xt, stride_xh, stride_wi, stride_wh,
                        True, DOT_FP32, BLOCK_T, BLOCK_I, BLOCK_H)            # [BT, BI]
    u = acc_u
    if ACT == 2:
        u = tl.maximum(u, 0.0)
    h = tl.where(alive, a * u, 0.0)
    out_offs = offs_t[:, None] * stride_ot + offs_i[None, :] * stride_oi
    tl.store(H_OUT + out_offs, h, mask=mask_ti)
    tl.store(ACTIVE + out_offs, (h != 0.0).to(tl.int8), mask=mask_ti)
    tl.store(UP_READ + offs_i, need_up.to(tl.int8), mask=mask_i)


@triton.jit
def _down_kernel(
    HACT, WD, PARTIAL,
    T, H, I, I_PER_SPLIT,
    stride_ht, stride_hi,
    stride_wi, stride_wh,
    stride_ps, stride_pt, stride_ph,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask_h = offs_h < H
    i_start = pid_s * I_PER_SPLIT
    i_end = tl.minimum(i_start + I_PER_SPLIT, I)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for i0 in range(i_start, i_end, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < i_end
        h = tl.load(HACT + offs_t[:, None] * stride_ht + offs_i[None, :] * stride_hi,
                    mask=mask_t[:, None] & mask_i[None, :], other=0.0)       # [BT, BI] fp32
        need = tl.max((h != 0.0).to(tl.int32), axis=0) > 0                   # [BI]
        w = tl.load(WD + offs_i[:, None] * stride_wi + offs_h[None, :] * stride_wh,
                    mask=need[:, None] & mask_h[None, :], other=0.0)         # [BI, BH]
        if DOT_FP32:
            acc += tl.dot(h, w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(h.to(w.dtype), w)
    tl.store(PARTIAL + pid_s * stride_ps + offs_t[:, None] * stride_pt + offs_h[None, :] * stride_ph,
             acc, mask=mask_t[:, None] & mask_h[None, :])


def sparse_ffn_triton(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act: str,
                      threshold: float = 0.0, predicted: Tensor | None = None,
                      dense_fallback_fraction: float = 1.0,
                      compact_config: CompactConfig | None = None,
                      predicted_group_counts: Tensor | None = None,
                      rows_read: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sparse FFN launcher.

    x [T, H] (T <= 64); w_gate, w_up, w_down_t [I, H] with unit stride along H and one dtype
    (float32 / float16 / bfloat16); predicted [T, I] bool or None. Returns (out [T, H] in
    x.dtype, active [T, I] bool).
    NOTE: a dense_fallback_fraction below 1 costs one host sync (the mask's density is read on
    the host); the default 1.0 keeps the call sync-free for CUDA graphs. At full density the
    compacted kernels read the same bytes as dense and cost only their fixed overhead
    (docs/benchmarks/kernels_gpu.md); kernels/sparse_ffn.py sends more rows to cuBLAS.
    compact_config tunes the compacted kernels (default: TUNED_CONFIGS).
    predicted_group_counts: the predictor's per-group counts of `predicted`
    (kernels/predictor_triton.py, group_counts=); given, the compaction launch is skipped.
    rows_read (int64 [3], optional): filled with the (gate, up, down) rows the path read, on
    the device (kernels/sparse_ffn.py).
    """
    check_act(act)
    check_device(x, w_gate, w_up, w_down_t)
    T, H = x.shape
    I = w_gate.shape[0]
    assert 1 <= T <= 64, f"decode batch must be 1..64, got {T}"
    assert w_gate.dtype in (torch.float32, torch.float16, torch.bfloat16), w_gate.dtype
    for w in (w_gate, w_up, w_down_t):
        assert w.shape == (I, H) and w.dtype == w_gate.dtype and w.stride(1) == 1, (
            w.shape, w.dtype, w.stride())
    assert w_up.stride() == w_gate.stride(), "w_gate and w_up must share strides"
    if predicted is not None:
        check_device(predicted)
        assert predicted.shape == (T, I) and predicted.dtype == torch.bool, predicted.shape
        if dense_fallback_fraction < 1.0:
            if predicted.any(0).float().mean().item() > dense_fallback_fraction:
                from sparse_serve.kernels.sparse_ffn_ref import dense_ffn
                return dense_ffn(x, w_gate, w_up, w_down_t, act, threshold, predicted, rows_read)
        predicted = predicted.contiguous()
    elif predicted_group_counts is not None:
        raise ValueError("predicted_group_counts needs the predicted mask it counts")
    elif T >= DOT_MIN_ROWS:
        return _exact_masked(x.contiguous(), w_gate, w_up, w_down_t, ACT_CODES[act], threshold,
                             rows_read)
    if predicted_group_counts is not None:
        check_device(predicted_group_counts)
        check_group_counts(predicted_group_counts, I)
    return ffn_compact(x.contiguous(), w_gate, w_up, w_down_t, ACT_CODES[act], threshold,
                       predicted, dot_in_fp32(w_gate.dtype), compact_config,
                       predicted_group_counts, rows_read)


def _exact_masked(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act_code: int,
                  threshold: float, rows_read: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact mode on the masked kernels (shapes as sparse_ffn_triton's, checked there)."""
    T, H = x.shape
    I = w_gate.shape[0]
    block_i, block_h = MASKED_BLOCK_I, MASKED_BLOCK_H
    block_t = max(16, next_pow2(T))
    dot_fp32 = dot_in_fp32(w_gate.dtype)

    h = torch.empty(T, I, dtype=torch.float32, device=x.device)          # [T, I]
    active = torch.empty(T, I, dtype=torch.int8, device=x.device)        # [T, I]
    up_read = torch.empty(I, dtype=torch.int8, device=x.device)          # [I] up row loaded
    _gate_up_kernel[(triton.cdiv(I, block_i),)](
        x, w_gate, w_up, h, active, up_read,
        T, H, I, float(threshold),
        x.stride(0), x.stride(1),
        w_gate.stride(0), w_gate.stride(1),
        h.stride(0), h.stride(1),
        ACT=act_code, DOT_FP32=dot_fp32,
        BLOCK_T=block_t, BLOCK_I=block_i, BLOCK_H=block_h,
    )

    num_h_blocks = triton.cdiv(H, block_h)
    # NOTE: enough programs to cover the SMs a few times over (H100: 132).
    split_i = max(1, min(triton.cdiv(I, 4 * block_i), triton.cdiv(512, num_h_blocks)))
    i_per_split = triton.cdiv(triton.cdiv(I, split_i), block_i) * block_i
    split_i = triton.cdiv(I, i_per_split)
    partial = torch.empty(split_i, T, H, dtype=torch.float32, device=x.device)  # [S, T, H]
    _down_kernel[(num_h_blocks, split_i)](
        h, w_down_t, partial,
        T, H, I, i_per_split,
        h.stride(0), h.stride(1),
        w_down_t.stride(0), w_down_t.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        DOT_FP32=dot_fp32,
        BLOCK_T=block_t, BLOCK_I=block_i, BLOCK_H=block_h,
    )
    out = partial.sum(0).to(x.dtype)                                     # [T, H]
    active = active.view(torch.bool)
    if rows_read is not None:
        rows_read[0].fill_(I)
        rows_read[1] = up_read.sum()
        rows_read[2] = active.any(0).sum()
    return out, active
