"""Triton sparse FFN, predicted mode, small batches (T < DOT_MIN_ROWS): no compaction pass.

At batch 1 and 90% sparsity a Mistral-7B layer reads ~35 MB, ~12 us of HBM time on an H100, so
fixed costs decide the speed-up. The compacted path (kernels/ffn_triton_compact.py) spends ~9 us
of them in its one-program compaction scan; here every program compacts its own block of
neurons in registers instead: the k-th live neuron of a block is the one whose inclusive prefix
count is k + 1 (a [BLOCK_I, BLOCK_N] comparison, no memory round trip, no global order needed).

_gate_up_kernel  grid (cdiv(I, BLOCK_N),): program p owns neurons [p*BLOCK_N, (p+1)*BLOCK_N):
    takes the batch union of their predicted rows, then for each chunk of BLOCK_I live neurons
    reads their gate and up rows (one pass over H), applies the activation and the per-row
    prediction, and writes h [T, I] (natural order, zeros for dead neurons) and ACTIVE.
_down_kernel     grid (cdiv(H, BLOCK_H), SPLIT): program (j, s) walks neuron range s in blocks
    of BLOCK_N, finds the neurons with h != 0 for some row, and accumulates their W_down_t rows'
    j-th column slice into PARTIAL[s] (no atomics).
reduce_partials  (kernels/ffn_triton_compact.py) sums PARTIAL in a fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.ffn_triton_compact import reduce_partials
from kernels.triton_utils import next_pow2


@dataclass(frozen=True)
class BlockwiseConfig:
    """Tiles of the two kernels (tuned by bench/tune_triton_ffn.py on a GPU)."""
    gate_block_n: int = 64     # neurons per gate/up program
    gate_block_i: int = 16     # live neurons per gate/up chunk
    gate_block_h: int = 1024   # hidden elements per step of the gate/up pass
    gate_warps: int = 4
    down_block_n: int = 128    # neurons per step of a down program's range
    down_block_i: int = 16     # live neurons per down chunk
    down_block_h: int = 256    # output columns per down program
    down_split: int = 16       # neuron ranges per column block (= partial sums)
    down_warps: int = 4


TUNED_CONFIG = BlockwiseConfig()


@triton.jit
def _live_chunk(live, csum, offs_n, c, BLOCK_I: tl.constexpr):
    """Ids of live neurons c .. c+BLOCK_I-1 of a block (0 past the last one) and their validity.
    live [BN] bool, csum [BN] its inclusive prefix count, offs_n [BN] the block's neuron ids."""
    k = c + tl.arange(0, BLOCK_I)
    sel = live[None, :] & (csum[None, :] == k[:, None] + 1)                   # [BI, BN]
    neuron = tl.sum(tl.where(sel, offs_n[None, :], 0), axis=1)                # [BI]
    return neuron, tl.sum(sel.to(tl.int32), axis=1) > 0


@triton.jit
def _gate_up_kernel(
    X, WG, WU, PRED, HN, ACTIVE,
    T, H, I, threshold,
    stride_xt, stride_wi, stride_pt, stride_ht, stride_at,
    ACT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs_n < I
    pred_all = tl.load(PRED + offs_t[:, None] * stride_pt + offs_n[None, :],
                       mask=mask_t[:, None] & in_range[None, :], other=0) != 0  # [BT, BN]
    live = (tl.max(pred_all.to(tl.int32), axis=0) > 0) & in_range             # [BN]
    # Dead neurons: h = 0 and inactive for every row; live ones are written below.
    dead = mask_t[:, None] & (in_range & (live == 0))[None, :]
    tl.store(HN + offs_t[:, None] * stride_ht + offs_n[None, :],
             tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32), mask=dead)
    tl.store(ACTIVE + offs_t[:, None] * stride_at + offs_n[None, :],
             tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.int8), mask=dead)
    csum = tl.cumsum(live.to(tl.int32), axis=0)                               # [BN]
    n_live = tl.sum(live.to(tl.int32), axis=0)
    offs_h = tl.arange(0, BLOCK_H)
    for c in range(0, n_live, BLOCK_I):
        neuron, valid = _live_chunk(live, csum, offs_n, c, BLOCK_I)
        row = neuron[:, None].to(tl.int64) * stride_wi
        acc_g = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + offs_h
            mask_h = hh < H
            x = tl.load(X + offs_t[:, None] * stride_xt + hh[None, :],
                        mask=mask_t[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
            wmask = valid[:, None] & mask_h[None, :]
            wg = tl.load(WG + row + hh[None, :], mask=wmask, other=0.0).to(tl.float32)
            wu = tl.load(WU + row + hh[None, :], mask=wmask, other=0.0).to(tl.float32)
            acc_g += tl.sum(x[:, None, :] * wg[None, :, :], axis=2)
            acc_u += tl.sum(x[:, None, :] * wu[None, :, :], axis=2)
        g = acc_g
        if ACT == 0:  # silu, CATS threshold on |silu(g)|
            s = g / (1.0 + tl.exp(-g))
            a = tl.where(tl.abs(s) > threshold, s, 0.0)
        elif ACT == 3:  # fatrelu
            a = tl.where(g > threshold, g, 0.0)
        else:  # relu, drelu
            a = tl.maximum(g, 0.0)
        u = acc_u
        if ACT == 2:
            u = tl.maximum(u, 0.0)
        mask_tv = mask_t[:, None] & valid[None, :]
        pred = tl.load(PRED + offs_t[:, None] * stride_pt + neuron[None, :], mask=mask_tv,
                       other=0) != 0                                           # [BT, BI]
        h = tl.where(pred, a * u, 0.0)
        tl.store(HN + offs_t[:, None] * stride_ht + neuron[None, :], h, mask=mask_tv)
        tl.store(ACTIVE + offs_t[:, None] * stride_at + neuron[None, :], (h != 0.0).to(tl.int8),
                 mask=mask_tv)


@triton.jit
def _down_kernel(
    HN, WD, PARTIAL,
    T, H, I, RANGE,
    stride_ht, stride_wi, stride_ps, stride_pt,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    start = pid_s * RANGE
    end = tl.minimum(start + RANGE, I)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < end
        hb = tl.load(HN + offs_t[:, None] * stride_ht + offs_n[None, :],
                     mask=mask_t[:, None] & in_range[None, :], other=0.0)     # [BT, BN]
        live = (tl.max((hb != 0.0).to(tl.int32), axis=0) > 0) & in_range
        csum = tl.cumsum(live.to(tl.int32), axis=0)
        n_live = tl.sum(live.to(tl.int32), axis=0)
        for c in range(0, n_live, BLOCK_I):
            neuron, valid = _live_chunk(live, csum, offs_n, c, BLOCK_I)
            h = tl.load(HN + offs_t[:, None] * stride_ht + neuron[None, :],
                        mask=mask_t[:, None] & valid[None, :], other=0.0)     # [BT, BI]
            w = tl.load(WD + neuron[:, None].to(tl.int64) * stride_wi + offs_h[None, :],
                        mask=valid[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(h[:, :, None] * w[None, :, :], axis=1)
    tl.store(PARTIAL + pid_s * stride_ps + offs_t[:, None] * stride_pt + offs_h[None, :], acc,
             mask=mask_t[:, None] & mask_h[None, :])


def ffn_blockwise(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act_code: int,
                  threshold: float, predicted: Tensor, config: BlockwiseConfig | None = None
                  ) -> tuple[Tensor, Tensor]:
    """x [T, H] contiguous (T < DOT_MIN_ROWS); w_* [I, H] with unit stride along H, one dtype;
    predicted [T, I] bool contiguous. Returns (out [T, H] in x.dtype, active [T, I] bool).
    Validation is the caller's (kernels/sparse_ffn_triton.py)."""
    config = config or TUNED_CONFIG
    T, H = x.shape
    I = w_gate.shape[0]
    block_t = next_pow2(T)
    pred = predicted.view(torch.int8)
    dev = x.device
    hn = torch.empty(T, I, dtype=torch.float32, device=dev)                # [T, I] fully written
    active = torch.empty(T, I, dtype=torch.int8, device=dev)               # [T, I]
    _gate_up_kernel[(triton.cdiv(I, config.gate_block_n),)](
        x, w_gate, w_up, pred, hn, active,
        T, H, I, float(threshold),
        x.stride(0), w_gate.stride(0), pred.stride(0), hn.stride(0), active.stride(0),
        ACT=act_code, BLOCK_T=block_t, BLOCK_N=config.gate_block_n,
        BLOCK_I=config.gate_block_i, BLOCK_H=config.gate_block_h, num_warps=config.gate_warps,
    )
    span = triton.cdiv(triton.cdiv(I, config.down_split), config.down_block_n) * config.down_block_n
    split = triton.cdiv(I, span)
    partial = torch.empty(split, T, H, dtype=torch.float32, device=dev)    # [S, T, H]
    _down_kernel[(triton.cdiv(H, config.down_block_h), split)](
        hn, w_down_t, partial,
        T, H, I, span,
        hn.stride(0), w_down_t.stride(0), partial.stride(0), partial.stride(1),
        BLOCK_T=block_t, BLOCK_N=config.down_block_n, BLOCK_I=config.down_block_i,
        BLOCK_H=config.down_block_h, num_warps=config.down_warps,
    )
    out = torch.empty(T, H, dtype=x.dtype, device=dev)                     # [T, H]
    reduce_partials(partial, out)
    return out, active.view(torch.bool)
