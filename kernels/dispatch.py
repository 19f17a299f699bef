"""Which tensors go to the Triton kernels: CUDA ones.

One switch for every entry point (sparse FFN, predictor, paged attention, and the attention
layer that calls it), read at call time, so that a test can send CPU tensors through Triton's
interpreter along the whole CUDA path of the engine (tests/kernels/test_engine_triton_path.py).
Importing this never imports Triton.
"""

from __future__ import annotations

from torch import Tensor


def runs_triton(t: Tensor) -> bool:
    """True where the Triton kernels take `t` (the engine's CUDA path)."""
    return t.is_cuda
