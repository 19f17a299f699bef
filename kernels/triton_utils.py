"""Small helpers shared by the Triton launchers."""

from __future__ import annotations

import os

import torch
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
