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


@triton.jit
def activate_gate(g, threshold, ACT: tl.constexpr):
    """The gate's activation, as kernels/sparse_ffn_ref.py defines it (float32 in and out;
    ACT is sparse_ffn_ref.ACT_CODES[act]); drelu's relu on the up projection is the caller's."""
    if ACT == 0:  # silu, CATS threshold on |silu(g)|
        s = g / (1.0 + tl.exp(-g))
        a = tl.where(tl.abs(s) > threshold, s, 0.0)
    elif ACT == 3:  # fatrelu
        a = tl.where(g > threshold, g, 0.0)
    else:  # relu, drelu
        a = tl.maximum(g, 0.0)
    return a
