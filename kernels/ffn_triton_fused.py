"""Triton sparse FFN, predicted mode, small batches (T < DOT_MIN_ROWS): one fused kernel.

At batch 1 and 90% sparsity a Mistral-7B layer reads ~35 MB, ~12 us of HBM time on an H100, so
fixed costs decide the speed-up: every launch boundary and every dependent load chain counts.
The compacted path (kernels/ffn_triton_compact.py) needs a global compaction pass and a down
pass that waits for it; this one needs neither.

_fused_kernel   grid (cdiv(I, BLOCK_N),): program p owns neurons [p*BLOCK_N, (p+1)*BLOCK_N).
    1. Loads the predicted mask for them, takes the batch union, and compacts the live neurons
       in registers: the k-th live neuron is the one whose inclusive prefix count is k + 1 (a
       [BLOCK_I, BLOCK_N] comparison, no memory round trip).
    2. For each chunk of BLOCK_I live neurons: reads their gate and up rows (one pass over H),
       applies the activation and the per-row prediction, writes ACTIVE and h into a small
       per-program scratch HC [P, T, BLOCK_N].
    3. For each BLOCK_HD slice of the output: accumulates h @ W_down_t over its live neurons'
       rows and writes PARTIAL[p] (no atomics).
_reduce_kernel  (kernels/ffn_triton_compact.py) sums PARTIAL over programs in a fixed order.
Dead neurons' rows are never read; programs with no live neuron only write zeros.
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
class FusedConfig:
    """Tiles of the fused kernel (tuned by bench/tune_triton_ffn.py on a GPU)."""
    block_n: int = 64        # neurons per program (also the number of partial sums: I / block_n)
    block_i: int = 16        # live neurons per chunk
    block_h: int = 1024      # hidden elements per step of the gate/up pass
    block_hd: int = 1024     # output columns per step of the down pass
    warps: int = 4


TUNED_CONFIG = FusedConfig()


@triton.jit
def _live_chunk(live, csum, offs_n, c, BLOCK_I: tl.constexpr):
    """Neuron ids of live neurons c .. c+BLOCK_I-1 (0 where past the last) and their validity."""
    k = c + tl.arange(0, BLOCK_I)
    sel = live[None, :] & (csum[None, :] == k[:, None] + 1)                   # [BI, BN]
    neuron = tl.sum(tl.where(sel, offs_n[None, :], 0), axis=1)                # [BI]
    return neuron, tl.sum(sel.to(tl.int32), axis=1) > 0


@triton.jit
def _fused_kernel(
    X, WG, WU, WD, PRED, HC, ACTIVE, PARTIAL,
    T, H, I, threshold,
    stride_xt, stride_wi, stride_wdi, stride_pt, stride_at,
    stride_hp, stride_ht, stride_pp, stride_ppt,
    ACT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs_n < I
    pred_all = tl.load(PRED + offs_t[:, None] * stride_pt + offs_n[None, :],
                       mask=mask_t[:, None] & in_range[None, :], other=0) != 0  # [BT, BN]
    live = (tl.max(pred_all.to(tl.int32), axis=0) > 0) & in_range             # [BN]
    # Dead neurons are inactive for every row; live ones are written with their h below.
    tl.store(ACTIVE + offs_t[:, None] * stride_at + offs_n[None, :],
             tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.int8),
             mask=mask_t[:, None] & (in_range & (live == 0))[None, :])
    csum = tl.cumsum(live.to(tl.int32), axis=0)                               # [BN]
    n_live = tl.sum(live.to(tl.int32), axis=0)
    offs_h = tl.arange(0, BLOCK_H)
    slots = tl.arange(0, BLOCK_I)

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
        tl.store(ACTIVE + offs_t[:, None] * stride_at + neuron[None, :], (h != 0.0).to(tl.int8),
                 mask=mask_tv)
        tl.store(HC + pid * stride_hp + offs_t[:, None] * stride_ht + (c + slots)[None, :], h,
                 mask=mask_tv)
    # NOTE: the down pass reads h written by other threads of this program.
    tl.debug_barrier()

    offs_d = tl.arange(0, BLOCK_HD)
    for d0 in range(0, H, BLOCK_HD):
        dd = d0 + offs_d
        mask_d = dd < H
        acc = tl.zeros((BLOCK_T, BLOCK_HD), dtype=tl.float32)
        for c in range(0, n_live, BLOCK_I):
            neuron, valid = _live_chunk(live, csum, offs_n, c, BLOCK_I)
            h = tl.load(HC + pid * stride_hp + offs_t[:, None] * stride_ht + (c + slots)[None, :],
                        mask=mask_t[:, None] & valid[None, :], other=0.0)      # [BT, BI]
            w = tl.load(WD + neuron[:, None].to(tl.int64) * stride_wdi + dd[None, :],
                        mask=valid[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(h[:, :, None] * w[None, :, :], axis=1)
        tl.store(PARTIAL + pid * stride_pp + offs_t[:, None] * stride_ppt + dd[None, :], acc,
                 mask=mask_t[:, None] & mask_d[None, :])


def ffn_fused(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act_code: int,
              threshold: float, predicted: Tensor, config: FusedConfig | None = None
              ) -> tuple[Tensor, Tensor]:
    """x [T, H] contiguous (T < DOT_MIN_ROWS); w_* [I, H] with unit stride along H, one dtype;
    predicted [T, I] bool contiguous. Returns (out [T, H] in x.dtype, active [T, I] bool).
    Validation is the caller's (kernels/sparse_ffn_triton.py)."""
    config = config or TUNED_CONFIG
    T, H = x.shape
    I = w_gate.shape[0]
    num_programs = triton.cdiv(I, config.block_n)
    pred = predicted.view(torch.int8)
    dev = x.device
    active = torch.empty(T, I, dtype=torch.int8, device=dev)                       # [T, I]
    hc = torch.empty(num_programs, T, config.block_n, dtype=torch.float32, device=dev)
    partial = torch.empty(num_programs, T, H, dtype=torch.float32, device=dev)     # [P, T, H]
    _fused_kernel[(num_programs,)](
        x, w_gate, w_up, w_down_t, pred, hc, active, partial,
        T, H, I, float(threshold),
        x.stride(0), w_gate.stride(0), w_down_t.stride(0), pred.stride(0), active.stride(0),
        hc.stride(0), hc.stride(1), partial.stride(0), partial.stride(1),
        ACT=act_code, BLOCK_T=next_pow2(T), BLOCK_N=config.block_n, BLOCK_I=config.block_i,
        BLOCK_H=config.block_h, BLOCK_HD=config.block_hd, num_warps=config.warps,
    )
    out = torch.empty(T, H, dtype=x.dtype, device=dev)                             # [T, H]
    reduce_partials(partial, out)
    return out, active.view(torch.bool)
