"""Paged-attention decode: one query token per sequence, K/V read through the block table.

Dispatch: CUDA tensors -> the Triton kernel (kernels/paged_attention_triton.py, imported lazily
so CPU-only processes never import Triton); CPU -> the native kernel that reads K/V in place
(kernels/paged_attention_cpu.py), or the batched torch reference (kernels/paged_attention_ref.py)
where it cannot be built or the dtype is not float32/bfloat16.
"""

from __future__ import annotations

from torch import Tensor

from sparse_serve.kernels import dispatch, paged_attention_cpu
from sparse_serve.kernels.paged_attention_ref import paged_attention_decode_ref


def paged_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float,
                           sliding_window: int | None = None,
                           max_context_len: int | None = None) -> Tensor:
    """q [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables
    [S, max_blocks] int32; context_lens [S] int32 (tokens in cache including the current one).
    Attends to positions p with ctx - sliding_window <= p < ctx. Returns [S, Hq, D].
    max_context_len: optional host-side bound on context_lens (the Triton kernel's number of
    context partitions; default the block table's capacity); the CPU path ignores it."""
    if dispatch.runs_triton(q):
        from sparse_serve.kernels import paged_attention_triton  # NOTE: lazy, see the module docstring
        return paged_attention_triton.paged_attention_decode_triton(
            q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
            max_context_len)
    if paged_attention_cpu.native_supported(q, k_cache, v_cache):
        return paged_attention_cpu.paged_attention_decode_native(q, k_cache, v_cache, block_tables, context_lens,
                                                                 scale, sliding_window)
    return paged_attention_decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale,
                                      sliding_window)
