"""Sparse-activation kernels: sparse FFN, activation predictor, paged-attention decode.

Each entry point dispatches CUDA tensors to a Triton kernel and CPU tensors to the best CPU
path (the one switch: kernels/dispatch.py); a pure-torch reference sits beside each kernel
(`*_ref.py`). Triton modules are
imported lazily, so importing this package never imports Triton.
"""

from kernels.paged_attention import paged_attention_decode
from kernels.sparse_ffn import default_dense_fallback, predict_active, sparse_ffn

__all__ = ["default_dense_fallback", "paged_attention_decode", "predict_active", "sparse_ffn"]
