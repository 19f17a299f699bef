"""Launcher of the native CPU paged-attention decode (kernels/csrc/paged_attention_cpu.cpp).

It reads K/V in place through the block table, where the torch path gathers every sequence's
context into a new tensor each step before reading it. Same contract as
kernels/paged_attention_ref.py (the definition); float32 and bfloat16 caches.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparse_serve.kernels import cpu_native

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def native_supported(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """CPU tensors of one supported dtype, contiguous, and a library that built."""
    return (q.device.type == "cpu" and q.dtype in _DTYPE_CODES and q.dtype == k_cache.dtype == v_cache.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous() and cpu_native.available())


def paged_attention_decode_native(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                  context_lens: Tensor, scale: float, sliding_window: int | None = None,
                                  out: Tensor | None = None) -> Tensor:
    """q [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [S, max_blocks]
    int32; context_lens [S] int32 (>= 1, at most max_blocks * block_size). Returns [S, Hq, D] in
    q.dtype, written into `out` when given."""
    S, Hq, D = q.shape
    num_blocks, block_size, Hkv, Dk = k_cache.shape
    assert v_cache.shape == k_cache.shape and Dk == D and Hq % Hkv == 0, (q.shape, k_cache.shape)
    assert block_tables.dtype == torch.int32 and block_tables.shape[0] == S, block_tables.shape
    assert context_lens.dtype == torch.int32 and context_lens.shape == (S,), context_lens.shape
    # NOTE: the kernel trusts these bounds (it reads raw pointers); checking them costs two small
    # reductions, nothing next to the reads they guard.
    if S:
        assert int(context_lens.min()) >= 1 and int(context_lens.max()) <= block_tables.shape[1] * block_size, \
            "context_lens out of the block table's range"
    q = q.contiguous()
    tables, lens = block_tables.contiguous(), context_lens.contiguous()
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    lib = cpu_native.load()
    rc = lib.paged_attention_decode_cpu(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                        lens.data_ptr(), out.data_ptr(), S, Hq, Hkv, D, block_size, tables.shape[1],
                                        float(scale), int(sliding_window or 0), _DTYPE_CODES[q.dtype])
    if rc != 0:
        raise RuntimeError(f"paged_attention_decode_cpu failed ({rc})")
    return out
