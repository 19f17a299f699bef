"""Triton sparse FFN for decode (batch 1..64), no host sync: the launcher.

Both modes run the compacted kernels of kernels/ffn_triton_compact.py: predicted mode (a mask
is given) compacts the mask; exact mode (no predictor: every gate row must be read to know
which neurons fire) first makes the mask with a dense pass over the gate rows.
NOTE: exact mode once ran on masked kernels of its own (whole-row masked loads of the up and
down rows of dead neurons, no compaction): on an H100 (bf16, Mistral-7B FFN, batch 1, 90%) they
took 109.5 us where the compacted path takes 61.8 us (2026-11-26, docs/benchmarks/
kernels_gpu_exact.md), so they were deleted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.ffn_triton_compact import CompactConfig, ffn_compact
from kernels.sparse_ffn_ref import ACT_CODES, check_act
from kernels.triton_utils import check_device, dot_in_fp32


def sparse_ffn_triton(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act: str,
                      threshold: float = 0.0, predicted: Tensor | None = None,
                      dense_fallback_fraction: float = 1.0,
                      compact_config: CompactConfig | None = None) -> tuple[Tensor, Tensor]:
    """Sparse FFN launcher.

    x [T, H] (T <= 64); w_gate, w_up, w_down_t [I, H] with unit stride along H and one dtype
    (float32 / float16 / bfloat16); predicted [T, I] bool or None. Returns (out [T, H] in
    x.dtype, active [T, I] bool).
    NOTE: a dense_fallback_fraction below 1 costs one host sync (the mask's density is read on
    the host); the default 1.0 keeps the call sync-free for CUDA graphs. At full density the
    compacted kernels read the same bytes as dense and cost only their fixed overhead (H100,
    bf16: 0.91-1.01x cuBLAS up to 8 rows; kernels/sparse_ffn.py sends more rows to cuBLAS).
    compact_config tunes the compacted kernels (both modes; default: TUNED_CONFIGS).
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
                from kernels.sparse_ffn_ref import dense_ffn
                return dense_ffn(x, w_gate, w_up, w_down_t, act, threshold, predicted)
        predicted = predicted.contiguous()
    return ffn_compact(x.contiguous(), w_gate, w_up, w_down_t, ACT_CODES[act], threshold,
                       predicted, dot_in_fp32(w_gate.dtype), compact_config)
