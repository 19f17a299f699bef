"""Triton TurboSparse activation predictor: fc2(relu(fc1 x)) > threshold, as a fused pair.

One kernel, launched twice with different epilogues: (1) z = relu(x @ fc1.T) into a float32
scratch [T, r]; (2) pred = (z @ fc2.T) > threshold written straight as a [T, I] mask. The
float32 logits [T, I] are never materialised. Grid (cdiv(N, BLOCK_N),): each program owns
BLOCK_N output features and streams their weight rows once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton_utils import (DOT_MIN_ROWS, check_device, dot_in_fp32, dot_k_tile, dot_pad,
                                  linear_tile, next_pow2, tuned_for)


@triton.jit
def _linear_epilogue_kernel(
    X, W, OUT,
    T, N, K, threshold,
    stride_xt, stride_xk,
    stride_wn, stride_wk,
    stride_ot, stride_on,
    EPILOGUE: tl.constexpr,  # 0: relu -> float32, 1: > threshold -> int8 mask
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    acc = linear_tile(X, W, offs_n, mask_n, T, K, stride_xt, stride_xk, stride_wn, stride_wk,
                      USE_DOT, DOT_FP32, BLOCK_T, BLOCK_N, BLOCK_K)           # [BT, BN]
    out_ptrs = OUT + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on
    mask = mask_t[:, None] & mask_n[None, :]
    if EPILOGUE == 0:
        tl.store(out_ptrs, tl.maximum(acc, 0.0), mask=mask)
    else:
        tl.store(out_ptrs, (acc > threshold).to(tl.int8), mask=mask)


@dataclass(frozen=True)
class PredictorConfig:
    """Tiles of both launches (tuned by bench/tune_triton_ffn.py on a GPU)."""
    block_n: int = 8
    block_k: int = 512
    warps: int = 4


# NOTE: as in kernels/ffn_triton_compact.py: under DOT_MIN_ROWS batch rows, multiply and reduce
# in registers (tl.dot would pad the rows to 16), and few output features per program, so that
# the narrow fc1 stage (r ~ 1000 outputs) still spreads over every SM.
# Winners of bench/tune_triton_ffn.py on an H100 (bf16, rank 1024, 2026-11-26).
TUNED_CONFIGS: dict[int, PredictorConfig] = {
    1: PredictorConfig(block_n=4, block_k=1024, warps=4),
    DOT_MIN_ROWS: PredictorConfig(block_n=32, block_k=256, warps=4),
}


def predict_active_triton(x: Tensor, fc1: Tensor, fc2: Tensor, threshold: float = 0.0,
                          config: PredictorConfig | None = None) -> Tensor:
    """x [T, H] (T <= 64), fc1 [r, H], fc2 [I, r] (one dtype, unit stride along the last dim).

    Returns [T, I] bool. The hidden layer z [T, r] is kept in float32.
    """
    check_device(x, fc1, fc2)
    T, H = x.shape
    r, I = fc1.shape[0], fc2.shape[0]
    assert 1 <= T <= 64, f"decode batch must be 1..64, got {T}"
    assert fc1.shape == (r, H) and fc2.shape == (I, r), (fc1.shape, fc2.shape)
    assert fc1.dtype == fc2.dtype and fc1.stride(1) == 1 and fc2.stride(1) == 1
    config = config or tuned_for(TUNED_CONFIGS, T)
    use_dot = T >= DOT_MIN_ROWS
    block_t = dot_pad(next_pow2(T), use_dot)
    block_n = dot_pad(config.block_n, use_dot)
    block_k = dot_k_tile(config.block_k, use_dot, fc1.element_size())
    dot_fp32 = dot_in_fp32(fc1.dtype)
    xw = x if dot_fp32 else x.to(fc1.dtype)
    z = torch.empty(T, r, dtype=torch.float32, device=x.device)          # [T, r]
    _linear_epilogue_kernel[(triton.cdiv(r, block_n),)](
        xw, fc1, z, T, r, H, 0.0,
        xw.stride(0), xw.stride(1), fc1.stride(0), fc1.stride(1), z.stride(0), z.stride(1),
        EPILOGUE=0, USE_DOT=use_dot, DOT_FP32=dot_fp32, BLOCK_T=block_t, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=config.warps)
    pred = torch.empty(T, I, dtype=torch.int8, device=x.device)          # [T, I]
    # NOTE: for a 16-bit fc2 the float32 z is rounded to fc2's dtype inside the dot (the
    # tensor-core path); the reference keeps float32, hence the tolerance near the threshold.
    _linear_epilogue_kernel[(triton.cdiv(I, block_n),)](
        z, fc2, pred, T, I, r, float(threshold),
        z.stride(0), z.stride(1), fc2.stride(0), fc2.stride(1), pred.stride(0), pred.stride(1),
        EPILOGUE=1, USE_DOT=use_dot, DOT_FP32=dot_fp32, BLOCK_T=block_t, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=config.warps)
    return pred.view(torch.bool)
