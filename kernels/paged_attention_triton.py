"""Triton paged-attention decode kernels (split-KV, "flash-decoding") and their launcher (CUDA,
or CPU under TRITON_INTERPRET=1).

Decode has one query token per sequence, so one program per (sequence, KV head) leaves most of
a GPU idle (8 programs for one Mistral sequence on 132 SMs). The context is therefore cut into
partitions of PARTITION positions: `_paged_attention_decode_kernel` runs on the grid
(S, Hkv, num_splits), one program per (sequence, KV head, partition). It handles all
Hq // Hkv query heads sharing the KV head (grouped-query attention: each K/V row is read once
per group; the group is padded to BLOCK_G >= 16 rows for tl.dot), walks its partition in tiles
of BLOCK_N positions through the block table with an online softmax in float32, and writes its
partial max, sum of exponentials and unnormalised output to float32 scratch.
`_paged_attention_reduce_kernel` (grid (S, Hq)) then combines a head's partials in a fixed
order (deterministic) and writes the output in q's dtype. When every context fits one
partition the first kernel normalises and writes the output itself (no scratch, no second
launch).

Partitions that hold no position to attend to (past the context, or wholly before the sliding
window) read no K/V and write nothing; the reduce reads only the partitions in
[window start // PARTITION, ceil(context / PARTITION)), which it derives from the same context
length. num_splits comes from a host-side bound on the context lengths (the engine's longest
context, or the block table's capacity), never from the device: no sync, so decode stays
capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_serve.kernels.triton_utils import check_device, dot_in_fp32, next_pow2

LOG2E = 1.4426950408889634
# NOTE: partials per step of the reduce, fixed (not sized to num_splits): one compiled reduce
# serves every context bound, and masked lanes cost nothing next to the K/V reads.
REDUCE_TILE = 16


@triton.jit
def _window_start(ctx, window, HAS_WINDOW: tl.constexpr):
    """The first position a query at context length ctx attends to."""
    start = ctx * 0
    if HAS_WINDOW:
        start = tl.maximum(ctx - window, 0)
    return start


@triton.jit
def _paged_attention_decode_kernel(
    Q, K, V, BLOCK_TABLES, CONTEXT_LENS, OUT, M_PART, L_PART, ACC_PART,
    qk_scale, window, block_size, group,
    stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kp, stride_kh, stride_kd,
    stride_vb, stride_vp, stride_vh, stride_vd,
    stride_bts, stride_btb,
    stride_os, stride_oh, stride_od,
    stride_ms, stride_mh, stride_mp,
    stride_as, stride_ah, stride_ap, stride_ad,
    D: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    PARTITION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Scores are kept in log2 units (qk_scale = scale * log2(e), exp2): M_PART holds them so.
    SPLIT: write partials to M_PART/L_PART/ACC_PART; else (one partition) the output to OUT."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    heads = kv_head * group + offs_g                                     # [BG]

    ctx = tl.load(CONTEXT_LENS + seq)
    lo = tl.maximum(split * PARTITION, _window_start(ctx, window, HAS_WINDOW))
    hi = tl.minimum(split * PARTITION + PARTITION, ctx)
    # NOTE: an empty partition (lo >= hi) has no live rows: it loops zero times and stores
    # nothing. (A bool tensor & a bool scalar breaks the interpreter's masks, hence tl.where.)
    mask_g = offs_g < tl.where(lo < hi, group, 0)
    q = tl.load(Q + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)      # [BG, BD]
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    # PARTITION is a multiple of BLOCK_N, so the first tile starts inside the partition and
    # holds position lo: every tile has a valid position and m_i is finite after it.
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        pos = n0 + offs_n                                                # [BN]
        valid = (pos >= lo) & (pos < hi)
        block = tl.load(BLOCK_TABLES + seq * stride_bts + (pos // block_size) * stride_btb,
                        mask=valid, other=0).to(tl.int64)                # [BN]
        slot = pos % block_size
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(K + block[:, None] * stride_kb + slot[:, None] * stride_kp
                    + kv_head * stride_kh + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)                             # [BN, BD]
        v = tl.load(V + block[:, None] * stride_vb + slot[:, None] * stride_vp
                    + kv_head * stride_vh + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)                             # [BN, BD]
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))                                   # [BG, BN] fp32
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])                                  # [BG, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)                                # [BG, BD] fp32
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_mask = mask_g[:, None] & mask_d[None, :]
    if SPLIT:
        part = seq * stride_ms + heads * stride_mh + split * stride_mp   # [BG]
        tl.store(M_PART + part, m_i, mask=mask_g)
        tl.store(L_PART + part, l_i, mask=mask_g)
        tl.store(ACC_PART + seq * stride_as + heads[:, None] * stride_ah + split * stride_ap
                 + offs_d[None, :] * stride_ad, acc, mask=out_mask)
    else:
        out = acc / l_i[:, None]
        tl.store(OUT + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(OUT.dtype.element_ty), mask=out_mask)


@triton.jit
def _paged_attention_reduce_kernel(
    CONTEXT_LENS, M_PART, L_PART, ACC_PART, OUT,
    window, num_splits,
    stride_ms, stride_mh, stride_mp,
    stride_as, stride_ah, stride_ap, stride_ad,
    stride_os, stride_oh, stride_od,
    D: tl.constexpr, HAS_WINDOW: tl.constexpr, PARTITION: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (sequence, query head): out = sum_p 2^(m_p - M) acc_p /
    sum_p 2^(m_p - M) l_p over the partitions p that hold positions, M their largest max.
    Two passes over the partials (max, then sums) in tiles of BLOCK_SPLITS, in a fixed order."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    ctx = tl.load(CONTEXT_LENS + seq)
    first = _window_start(ctx, window, HAS_WINDOW) // PARTITION
    # NOTE: clamped so that a max_context_len below a context drops positions, never reads
    # past the scratch.
    last = tl.minimum(tl.cdiv(ctx, PARTITION), num_splits)
    M = M_PART + seq * stride_ms + head * stride_mh
    m_max = tl.full((BLOCK_SPLITS,), float("-inf"), dtype=tl.float32)
    for p0 in range(first, last, BLOCK_SPLITS):
        parts = p0 + offs_p
        m_max = tl.maximum(m_max, tl.load(M + parts * stride_mp, mask=parts < last,
                                          other=float("-inf")))
    m_all = tl.max(m_max, axis=0)
    l_sum = tl.zeros((BLOCK_SPLITS,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_SPLITS, BLOCK_D), dtype=tl.float32)
    for p0 in range(first, last, BLOCK_SPLITS):
        parts = p0 + offs_p
        mask_p = parts < last
        w = tl.exp2(tl.load(M + parts * stride_mp, mask=mask_p, other=float("-inf")) - m_all)
        l_sum += w * tl.load(L_PART + seq * stride_ms + head * stride_mh + parts * stride_mp,
                             mask=mask_p, other=0.0)
        acc += w[:, None] * tl.load(ACC_PART + seq * stride_as + head * stride_ah
                                    + parts[:, None] * stride_ap + offs_d[None, :] * stride_ad,
                                    mask=mask_p[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(acc, axis=0) / tl.sum(l_sum, axis=0)                    # [BD]
    tl.store(OUT + seq * stride_os + head * stride_oh + offs_d * stride_od,
             out.to(OUT.dtype.element_ty), mask=mask_d)


def paged_attention_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                                  block_tables: Tensor, context_lens: Tensor, scale: float,
                                  sliding_window: int | None = None,
                                  max_context_len: int | None = None, *,
                                  partition: int = 128, block_n: int = 32,
                                  num_warps: int = 4) -> Tensor:
    """q [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables
    [S, max_blocks] int32; context_lens [S] int32 (>= 1, including the current token).
    Returns [S, Hq, D] in q.dtype.

    max_context_len: a host-side bound on context_lens (>= every entry; a smaller one drops the
    positions past it), which sets the number of partitions; default, the block table's
    capacity max_blocks * block_size. Partitions past a sequence's context cost a program that
    exits, not a read. partition (a multiple of block_n): positions per program; block_n:
    positions per step of its loop.

    NOTE: the defaults (128 positions per program, 32 per step, 4 warps) are within 20% of the
    fastest tile `python bench/paged_attention.py` measured on an H100 at every size:
    docs/benchmarks/paged_attention_gpu.md#default-tile.
    """
    check_device(q, k_cache, v_cache, block_tables, context_lens)
    S, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    assert v_cache.shape == k_cache.shape and Dk == D, (q.shape, k_cache.shape, v_cache.shape)
    assert Hq % Hkv == 0, f"Hq={Hq} must be a multiple of Hkv={Hkv}"
    assert block_tables.dtype == torch.int32 and block_tables.shape[0] == S, block_tables.shape
    assert context_lens.dtype == torch.int32 and context_lens.shape == (S,), context_lens.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype)
    assert partition % block_n == 0, (partition, block_n)
    group = Hq // Hkv
    bound = max_context_len if max_context_len is not None else block_tables.shape[1] * block_size
    num_splits = max(1, -(-bound // partition))
    has_window = sliding_window is not None
    window = int(sliding_window or 0)
    out = torch.empty_like(q)                                            # [S, Hq, D]
    if num_splits > 1:
        m_part = torch.empty(S, Hq, num_splits, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)                                # [S, Hq, P]
        acc_part = torch.empty(S, Hq, num_splits, D, dtype=torch.float32, device=q.device)
        part_strides = (*m_part.stride(), *acc_part.stride())
    else:  # NOTE: one partition: the first kernel writes `out` and never touches these
        m_part = l_part = acc_part = out
        part_strides = (0,) * 7
    block_d = max(16, next_pow2(D))
    _paged_attention_decode_kernel[(S, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, m_part, l_part, acc_part,
        float(scale) * LOG2E, window, block_size, group,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        *part_strides,
        D=D, HAS_WINDOW=has_window, SPLIT=num_splits > 1, DOT_FP32=dot_in_fp32(k_cache.dtype),
        PARTITION=partition, BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    if num_splits > 1:
        _paged_attention_reduce_kernel[(S, Hq)](
            context_lens, m_part, l_part, acc_part, out, window, num_splits,
            *m_part.stride(), *acc_part.stride(), *out.stride(),
            D=D, HAS_WINDOW=has_window, PARTITION=partition,
            BLOCK_SPLITS=REDUCE_TILE, BLOCK_D=block_d, num_warps=4,
        )
    return out
