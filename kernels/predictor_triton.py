"""Triton TurboSparse activation predictor: fc2(relu(fc1 x)) > threshold, as a fused pair.

One kernel, launched twice with different epilogues: (1) z = relu(x @ fc1.T) into a float32
scratch [T, r]; (2) pred = (z @ fc2.T) > threshold written straight as a [T, I] mask. The
float32 logits [T, I] are never materialised. Grid (cdiv(N, BLOCK_N),): each program owns
BLOCK_N output features and streams their weight rows once.

Optionally the second launch also counts, per group of consecutive neurons
(sparse_ffn_ref.prediction_groups), the neurons that some batch row predicts: each program adds
its own union's size to its group's counter (integer atomics: the result does not depend on the
order). The first launch zeroes the counters (it runs to completion before the second starts).
The CUDA FFN finds its neurons from these counts, so it needs no compaction launch.

Weight-only int8 predictors (fc1, fc2 int8 with one fp32 scale per row): each launch multiplies
its outputs by their rows' scales before the epilogue (z = relu(s1 * (x @ q1.T)), logits =
s2 * (z @ q2.T)), so the weights are read at 1 byte each. NOTE: for bench/gpu_e2e.py's
`sparse-int8pred` variant; no serving flag selects it on a GPU until a device run shows what it
saves (issue 17).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_serve.kernels.sparse_ffn_ref import check_group_counts, prediction_groups
from sparse_serve.kernels.triton_utils import (
    DOT_MIN_ROWS,
    check_device,
    dot_in_fp32,
    dot_k_tile,
    dot_pad,
    linear_tile,
    next_pow2,
    tuned_for,
)


@triton.jit
def _linear_epilogue_kernel(
    X, W, OUT, GROUP_COUNTS, SCALE,
    T, N, K, threshold, num_groups,
    stride_xt, stride_xk,
    stride_wn, stride_wk,
    stride_ot, stride_on,
    EPILOGUE: tl.constexpr,  # 0: relu -> float32, 1: > threshold -> int8 mask
    COUNT_GROUPS: tl.constexpr,  # 0: zero GROUP_COUNTS, 1: add to them
    HAS_SCALE: tl.constexpr,  # int8 W: multiply output n by SCALE[n]
    GROUP: tl.constexpr, GROUPS_POW2: tl.constexpr,
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
    if HAS_SCALE:
        acc = acc * tl.load(SCALE + offs_n, mask=mask_n, other=0.0)[None, :]
    out_ptrs = OUT + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on
    mask = mask_t[:, None] & mask_n[None, :]
    if EPILOGUE == 0:
        tl.store(out_ptrs, tl.maximum(acc, 0.0), mask=mask)
        if COUNT_GROUPS:
            if pid == 0:
                offs_g = tl.arange(0, GROUPS_POW2)
                tl.store(GROUP_COUNTS + offs_g, tl.zeros([GROUPS_POW2], dtype=tl.int32),
                         mask=offs_g < num_groups)
    else:
        fired = mask & (acc > threshold)                                     # [BT, BN]
        tl.store(out_ptrs, fired.to(tl.int8), mask=mask)
        if COUNT_GROUPS:
            # NOTE: BLOCK_N divides GROUP (both powers of two; asserted by the launcher), so a
            # program's neurons lie in one group: one atomic per program.
            union = tl.max(fired.to(tl.int32), axis=0)                        # [BN]
            tl.atomic_add(GROUP_COUNTS + (pid * BLOCK_N) // GROUP, tl.sum(union, axis=0),
                          sem="relaxed")


@dataclass(frozen=True)
class PredictorConfig:
    """Tiles of the two launches (tuned by bench/tune_triton_ffn.py on a GPU): fc2 [I, r], the
    wide one, and fc1 [r, H], whose r (~1000) outputs are spread over far fewer programs."""
    block_n: int = 8          # fc2
    block_k: int = 512
    warps: int = 4
    fc1_block_n: int = 8
    fc1_block_k: int = 512
    fc1_warps: int = 4


# NOTE: as in kernels/ffn_triton_compact.py: under DOT_MIN_ROWS batch rows, multiply and reduce
# in registers (tl.dot would pad the rows to 16), and few output features per program, so that
# the narrow fc1 stage (r ~ 1000 outputs) still spreads over every SM.
# Winners of bench/tune_triton_ffn.py on an H100 (bf16, rank 1024; how they were chosen and
# timed: docs/benchmarks/kernels_gpu.md#tuned-tiles). Batch 1 gives fc1 its own narrow tile; from
# DOT_MIN_ROWS rows both launches share one.
TUNED_CONFIGS: dict[int, PredictorConfig] = {
    1: PredictorConfig(block_n=8, block_k=1024, warps=4,
                       fc1_block_n=1, fc1_block_k=2048, fc1_warps=4),
    DOT_MIN_ROWS: PredictorConfig(block_n=32, block_k=256, warps=4,
                                  fc1_block_n=32, fc1_block_k=256, fc1_warps=4),
}


def predict_active_triton(x: Tensor, fc1: Tensor, fc2: Tensor, threshold: float = 0.0,
                          config: PredictorConfig | None = None,
                          group_counts: Tensor | None = None,
                          scales: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """x [T, H] (T <= 64), fc1 [r, H], fc2 [I, r] (one dtype, unit stride along the last dim).

    Returns [T, I] bool. The hidden layer z [T, r] is kept in float32. group_counts, if given
    (int32 [groups of sparse_ffn_ref.prediction_groups(I)], contiguous), is filled with the
    number of predicted neurons per group (sparse_ffn_ref.group_counts_ref). scales: the fp32
    per-row scales ([r], [I], contiguous) of int8 fc1 and fc2, required for int8 weights.
    """
    check_device(x, fc1, fc2)
    T, H = x.shape
    r, I = fc1.shape[0], fc2.shape[0]
    assert 1 <= T <= 64, f"decode batch must be 1..64, got {T}"
    assert fc1.shape == (r, H) and fc2.shape == (I, r), (fc1.shape, fc2.shape)
    assert fc1.dtype == fc2.dtype and fc1.stride(1) == 1 and fc2.stride(1) == 1
    int8 = fc1.dtype == torch.int8
    assert int8 == (scales is not None), "int8 weights go with their per-row scales, float ones without"
    if int8:
        check_device(*scales)
        assert all(s.dtype == torch.float32 and s.is_contiguous() for s in scales)
        assert scales[0].shape == (r,) and scales[1].shape == (I,), (scales[0].shape, scales[1].shape)
    scale1, scale2 = scales if int8 else (x, x)   # (not read without HAS_SCALE)
    config = config or tuned_for(TUNED_CONFIGS, T)
    use_dot = T >= DOT_MIN_ROWS
    block_t = dot_pad(next_pow2(T), use_dot)
    block_n = dot_pad(config.block_n, use_dot)
    block_k = dot_k_tile(config.block_k, use_dot, fc1.element_size())
    fc1_block_n = dot_pad(config.fc1_block_n, use_dot)
    fc1_block_k = dot_k_tile(config.fc1_block_k, use_dot, fc1.element_size())
    dot_fp32 = dot_in_fp32(fc1.dtype)
    group, num_groups = prediction_groups(I)
    count_groups = group_counts is not None
    if count_groups:
        check_device(group_counts)
        check_group_counts(group_counts, I)
        assert group % block_n == 0, (group, block_n)   # a program's neurons in one group
    counts_arg = group_counts if count_groups else x   # (not touched unless counting)
    counting = dict(COUNT_GROUPS=count_groups, GROUP=group, GROUPS_POW2=next_pow2(num_groups))
    xw = x if dot_fp32 or int8 else x.to(fc1.dtype)   # int8: linear_tile casts x for the dot
    z = torch.empty(T, r, dtype=torch.float32, device=x.device)          # [T, r]
    _linear_epilogue_kernel[(triton.cdiv(r, fc1_block_n),)](
        xw, fc1, z, counts_arg, scale1, T, r, H, 0.0, num_groups,
        xw.stride(0), xw.stride(1), fc1.stride(0), fc1.stride(1), z.stride(0), z.stride(1),
        EPILOGUE=0, **counting, HAS_SCALE=int8, USE_DOT=use_dot, DOT_FP32=dot_fp32, BLOCK_T=block_t,
        BLOCK_N=fc1_block_n, BLOCK_K=fc1_block_k, num_warps=config.fc1_warps)
    pred = torch.empty(T, I, dtype=torch.int8, device=x.device)          # [T, I]
    # NOTE: for a 16-bit fc2 the float32 z is rounded to fc2's dtype inside the dot (the
    # tensor-core path); the reference keeps float32, hence the tolerance near the threshold.
    _linear_epilogue_kernel[(triton.cdiv(I, block_n),)](
        z, fc2, pred, counts_arg, scale2, T, I, r, float(threshold), num_groups,
        z.stride(0), z.stride(1), fc2.stride(0), fc2.stride(1), pred.stride(0), pred.stride(1),
        EPILOGUE=1, **counting, HAS_SCALE=int8, USE_DOT=use_dot, DOT_FP32=dot_fp32, BLOCK_T=block_t,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=config.warps)
    return pred.view(torch.bool)
