"""Triton paged-attention decode kernel and its launcher (CUDA, or CPU under TRITON_INTERPRET=1).

Grid (S, Hkv): one program per (sequence, KV head) handles all Hq // Hkv query heads that share
the KV head (grouped-query attention), so each K/V row is read once per group. It walks the
sequence's positions in tiles of BLOCK_N, maps each position to (physical block, slot) through
the block table, and keeps an online softmax in float32. With a sliding window the walk starts
at the window, so older blocks are never read. Query heads are padded to BLOCK_G >= 16 for tl.dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton_utils import check_device, next_pow2


@triton.jit
def _paged_attention_decode_kernel(
    Q, K, V, BLOCK_TABLES, CONTEXT_LENS, OUT,
    scale, window, block_size, group,
    stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kp, stride_kh, stride_kd,
    stride_vb, stride_vp, stride_vh, stride_vd,
    stride_bts, stride_btb,
    stride_os, stride_oh, stride_od,
    D: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < group
    mask_d = offs_d < D
    heads = kv_head * group + offs_g                                     # [BG]
    q = tl.load(Q + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # [BG, BD]
    q = q * scale

    ctx = tl.load(CONTEXT_LENS + seq)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(ctx - window, 0)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for n0 in range((start // BLOCK_N) * BLOCK_N, ctx, BLOCK_N):
        pos = n0 + offs_n                                                # [BN]
        valid = (pos < ctx) & (pos >= start)
        block = tl.load(BLOCK_TABLES + seq * stride_bts + (pos // block_size) * stride_btb,
                        mask=valid, other=0)                             # [BN]
        slot = pos % block_size
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(K + block[:, None] * stride_kb + slot[:, None] * stride_kp
                    + kv_head * stride_kh + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0).to(tl.float32)              # [BN, BD]
        v = tl.load(V + block[:, None] * stride_vb + slot[:, None] * stride_vp
                    + kv_head * stride_vh + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0).to(tl.float32)              # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision="ieee")               # [BG, BN]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(OUT + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])


def paged_attention_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                                  block_tables: Tensor, context_lens: Tensor, scale: float,
                                  sliding_window: int | None = None,
                                  block_n: int = 16, num_warps: int = 8) -> Tensor:
    """q [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables
    [S, max_blocks] int32; context_lens [S] int32 (>= 1, including the current token).
    Returns [S, Hq, D] in q.dtype.

    NOTE: the default tile is the one that compiles without register spills at head dim 128
    (`python bench/compile_check.py`, bf16, sm_90 and sm_89): 16 positions, 8 warps use 166
    registers; the former 32 positions, 4 warps spilled 548-3124 bytes per thread. Not yet
    timed on a GPU.
    """
    check_device(q, k_cache, v_cache, block_tables, context_lens)
    S, Hq, D = q.shape
    num_blocks, block_size, Hkv, Dk = k_cache.shape
    assert v_cache.shape == k_cache.shape and Dk == D, (q.shape, k_cache.shape, v_cache.shape)
    assert Hq % Hkv == 0, f"Hq={Hq} must be a multiple of Hkv={Hkv}"
    assert block_tables.dtype == torch.int32 and block_tables.shape[0] == S, block_tables.shape
    assert context_lens.dtype == torch.int32 and context_lens.shape == (S,), context_lens.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype)
    group = Hq // Hkv
    out = torch.empty_like(q)                                            # [S, Hq, D]
    _paged_attention_decode_kernel[(S, Hkv)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        float(scale), int(sliding_window or 0), block_size, group,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        D=D, HAS_WINDOW=sliding_window is not None,
        BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(D)),
        num_warps=num_warps,
    )
    return out
