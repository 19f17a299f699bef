"""Small helpers shared by the Triton kernels and their launchers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter (tests)."""
    for t in tensors:
        assert t.is_cuda or interpreting(), (
            f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands are upcast to float32 (computed with IEEE precision).

    NOTE: float32 weights must not go through TF32; and the interpreter's tl.dot on bfloat16
    is broken, so under TRITON_INTERPRET=1 every dtype is upcast before tl.dot.
    """
    return dtype == torch.float32 or interpreting()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# NOTE: below this many batch rows the kernels multiply and reduce in registers; from here on
# they use tl.dot, which needs the row and neuron tiles padded to 16.
DOT_MIN_ROWS = 4


def dot_pad(n: int, use_dot: bool) -> int:
    """A tile dimension as launched: tl.dot needs at least 16."""
    return max(16, n) if use_dot else n


def dot_k_tile(block: int, use_dot: bool, element_size: int) -> int:
    """The reduction tile of a tl.dot loop: tiles are tuned for 16-bit weights, and 4-byte
    ones halve it (the same bytes per tile; the full width overflows shared memory)."""
    return max(16, block // 2) if use_dot and element_size == 4 else block


def tuned_for(table: dict, rows: int):
    """The entry of a {batch-size bucket: config} table that applies to `rows` rows: the
    largest bucket <= rows."""
    return table[max(b for b in table if b <= rows)]


@triton.jit
def activate_gate(g, threshold, ACT: tl.constexpr):
    """The gate's activation, as kernels/sparse_ffn_ref.py defines it (float32 in and out;
    ACT is activations.ACT_CODES[act]); drelu's relu on the up projection is the caller's."""
    if ACT == 0:  # silu, CATS threshold on |silu(g)|
        s = g / (1.0 + tl.exp(-g))
        a = tl.where(tl.abs(s) > threshold, s, 0.0)
    elif ACT == 3:  # fatrelu
        a = tl.where(g > threshold, g, 0.0)
    else:  # relu, drelu
        a = tl.maximum(g, 0.0)
    return a


@triton.jit
def linear_tile(X, W, offs_n, mask_n, T, K, stride_xt, stride_xk, stride_wn, stride_wk,
                USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_T, BLOCK_N] float32: rows 0..T-1 of X [T, K] times rows offs_n of W [N, K]
    transposed, streaming K in BLOCK_K steps (multiply-reduce in registers below the tl.dot
    batch size, tl.dot from there; DOT_FP32 as in dot_in_fp32). An int8 W (weight-only int8,
    its scales applied by the caller) enters tl.dot as bfloat16, which holds every int8 exactly."""
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn                      # [BN, 1]
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(X + offs_t[:, None] * stride_xt + kk[None, :] * stride_xk,
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)         # [BT, BK]
        w = tl.load(w_rows + kk[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)         # [BN, BK]
        if not USE_DOT:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        elif DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif W.dtype.element_ty == tl.int8:
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        else:
            acc += tl.dot(x.to(w.dtype), tl.trans(w))
    return acc
