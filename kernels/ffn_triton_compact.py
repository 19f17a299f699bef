"""Triton sparse FFN: the active neurons compacted on the device, then only their rows read.

Why compact: a masked load of a block of rows issues the same instructions whether 3 or 32 of
its rows are live, so at 90% sparsity a mask-based kernel keeps a tenth of the bytes in flight
that a dense GEMV does and ends up latency-bound. Compacting the union into a list of neuron
ids first makes every row a program loads a live one, so the sparse kernel streams the way a
dense one does, over a tenth of the rows. The list and its length stay on the device: no host
sync, so decode can be captured in a CUDA graph.

Launches (predicted mode: a mask is given):
  _compact_kernel       grid (cdiv(I, BLOCK),): union of the predicted mask's rows -> IDX
      (ascending neuron ids), COUNT; also zeroes ACTIVE for the neurons outside the union.
      Program p counts the live neurons before its block itself, so no program waits on another.
  _gate_up_kernel       grid (a few programs per SM, CompactConfig.gate_programs_per_sm): program
      p takes the blocks of BLOCK_I compact slots p, p + num_programs, ... up to COUNT
      (programs past COUNT return at once), reads those neurons' gate and up rows in one pass
      over H, applies the activation and the per-row prediction, writes h in compact order
      HC [T, slot] and ACTIVE [T, neuron].
  _down_kernel          grid (cdiv(H, BLOCK_H), SPLIT): program (j, s) accumulates
      HC[:, slot] * W_down_t[IDX[slot], j-th slice] over slots s*BLOCK_K + k*SPLIT*BLOCK_K
      (interleaved, so the splits stay balanced whatever COUNT is) into PARTIAL[s].
  _reduce_kernel        sums PARTIAL over the splits and casts to the output dtype
      (deterministic: no atomics, fixed order). With CompactConfig.down_fused_reduce the down
      kernel does this itself instead: the last of a column block's SPLIT programs to finish
      (a ticket counter per column block) sums that block's partials, one launch fewer.
With the predictor's per-group counts (kernels/predictor_triton.py counts the predicted neurons
of each group of 128 as it writes the mask; the engine's CUDA path) there is no compaction
launch: _gate_up_counted_kernel, a fixed grid of a few programs per SM taking slot blocks in
turn, finds each block's neurons from the counts and the groups' mask (_neurons_of_slots; the
same ascending order, so the output is bit for bit the same), writes IDX and COUNT for the down
kernel, and zeroes ACTIVE for the unpredicted neurons of its share of the layer. It costs each
program one more dependent load at its head (the counts, then the mask of the block's groups)
and saves the compaction launch and one launch gap.
NOTE: keep the compaction (a launch, or the predictor's counts) and plain loops: the
alternatives measured on an H100 lost and were deleted (gate/up programs compacting their own
neurons in registers, programmatic dependent launches, loads issued a step ahead by hand, L2
prefetches of the next kernel's rows): docs/benchmarks/kernels_gpu.md#designs-tried.
Exact mode (no predictor) first runs _gate_pass_kernel, a dense pass over every gate row that
writes the gate's activation and the alive mask (activation != 0); that mask is then compacted
like a predicted one, and _gate_up_kernel reads only the alive neurons' up rows (the activation
is loaded, not recomputed), then down and reduce as above.
Semantics are kernels/sparse_ffn_ref.py's; the up row of a predicted neuron is read even where
its gate comes out zero (one pass over H keeps both rows' loads in flight together; the result
is the same).
Rows read: the listed neurons' (COUNT of them) gate, up and down rows; in exact mode every gate
row (the dense pass) and the listed (alive) neurons' up and down rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_serve.kernels.sparse_ffn_ref import prediction_groups
from sparse_serve.kernels.triton_utils import (
    DOT_MIN_ROWS,
    activate_gate,
    dot_k_tile,
    dot_pad,
    linear_tile,
    next_pow2,
    tuned_for,
)


@dataclass(frozen=True)
class CompactConfig:
    """Tile sizes of the compacted kernels (tuned by bench/tune_triton_ffn.py on a GPU)."""
    gate_block_i: int = 8        # neurons per gate/up program
    gate_block_h: int = 512      # hidden elements per step of the gate/up loop
    gate_warps: int = 4
    down_block_k: int = 16       # compact slots per step of the down loop
    down_block_h: int = 256      # output columns per down program
    down_split: int = 16         # programs along the neuron list per column block
    down_warps: int = 4
    # neurons per compaction program; 0: one program for the whole mask (up to
    # _COMPACT_MAX_BLOCK neurons). More programs each recount the live neurons before their
    # block from the (small, L2-resident) mask.
    scan_block: int = 0
    # exact mode's dense pass over the gate rows (predicted mode skips it)
    gate_pass_block_i: int = 4
    gate_pass_block_h: int = 1024
    gate_pass_warps: int = 4
    # True: no reduce launch; the last down program of each column block sums the partials.
    down_fused_reduce: bool = False
    # software-pipelining depth of the gate/up and down loops (Triton's default is 3)
    gate_stages: int = 3
    down_stages: int = 3
    # gate/up programs per SM (either path): each takes slot blocks in turn (the batch-1 winner,
    # given the counts: 12 programs of one warp and one neuron); 0: one program per slot block
    # of the whole layer, most of them with none to do
    gate_programs_per_sm: int = 4


# Per batch size bucket (the largest bucket <= T applies): the winners of
# `python bench/tune_triton_ffn.py` on an H100 (bf16, Mistral-7B FFN, 90% sparsity; how they were
# chosen and timed: docs/benchmarks/kernels_gpu.md#tuned-tiles). Tiles are tuned for 16-bit
# weights; float32 ones halve the hidden-dimension tiles of the tl.dot path (same bytes per tile,
# or shared memory overflows).
TUNED_CONFIGS: dict[int, CompactConfig] = {
    # Swept on the engine's path (the predictor's group counts given): one neuron a program and
    # 12 programs per SM balance the ~1430 listed neurons (90%) over the SMs, and one-warp down
    # programs with split 32 take 1-2 steps each. NOTE: the mask path (compaction launch; exact
    # mode) runs these tiles too, untimed on a GPU with its current grid.
    1: CompactConfig(gate_block_i=1, gate_block_h=2048, gate_warps=1, down_block_k=32,
                     down_block_h=128, down_split=32, down_warps=1, scan_block=1024,
                     gate_pass_block_h=2048, down_fused_reduce=True, gate_programs_per_sm=12),
    # NOTE: not re-swept on the current kernels. scan_block=1024: a one-program scan of the whole
    # mask needs 128 KiB of shared memory from 4 rows on, over an sm_89's 99 KiB
    # (`python bench/compile_check.py`); gate_programs_per_sm=2: what fits an SM at the gate/up
    # kernels' 196-200 registers a thread and 80 KiB of shared memory (Triton 3.6, sm_90).
    # (Exact mode from these rows runs the masked kernels of kernels/sparse_ffn_triton.py.)
    DOT_MIN_ROWS: CompactConfig(gate_block_i=32, gate_block_h=256, gate_warps=4, down_block_k=32,
                                down_block_h=128, down_split=16, down_warps=2, scan_block=1024,
                                gate_programs_per_sm=2),
}


def default_config(T: int) -> CompactConfig:
    return tuned_for(TUNED_CONFIGS, T)


@triton.jit
def _union_of_rows(PRED, offs, in_range, T, stride_pt):
    """int32, offs' shape: 1 where some batch row predicts neuron offs, 0 elsewhere."""
    union = tl.zeros(offs.shape, dtype=tl.int32)
    for t in range(0, T):
        p = tl.load(PRED + t * stride_pt + offs, mask=in_range, other=0)
        union = tl.maximum(union, (p != 0).to(tl.int32))
    return union


@triton.jit
def _compact_kernel(PRED, IDX, COUNT, ACTIVE, T, I, stride_pt, stride_at,
                    BLOCK: tl.constexpr, SCAN: tl.constexpr):
    # NOTE: program p counts the live neurons before its block itself (a sum over the mask, no
    # cross-program communication), so the slots stay in ascending neuron order: the
    # down-projection sums are deterministic.
    pid = tl.program_id(0)
    first = pid * BLOCK
    before = tl.sum(tl.zeros([SCAN], dtype=tl.int32), axis=0)   # an int32 scalar (loop-carried)
    for i0 in range(0, first, SCAN):
        offs = i0 + tl.arange(0, SCAN)
        before += tl.sum(_union_of_rows(PRED, offs, offs < first, T, stride_pt), axis=0)
    offs = first + tl.arange(0, BLOCK)
    in_range = offs < I
    union = _union_of_rows(PRED, offs, in_range, T, stride_pt)
    pos = before + tl.cumsum(union, axis=0) - 1
    tl.store(IDX + pos, offs, mask=in_range & (union != 0))
    for t in range(0, T):
        tl.store(ACTIVE + t * stride_at + offs, tl.zeros([BLOCK], dtype=tl.int8),
                 mask=in_range & (union == 0))
    tl.store(COUNT, before + tl.sum(union, axis=0), mask=pid == tl.num_programs(0) - 1)


@triton.jit
def _gate_up_rows(
    X, WG, WU, GATE, PRED, HC, ACTIVE, neuron, live, slots,
    T, H, threshold,
    stride_xt, stride_wi, stride_gt, stride_pt, stride_ht, stride_at,
    ACT: tl.constexpr, GATE_GIVEN: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """h of the [BLOCK_I] neurons `neuron` (where `live`) -> HC[:, slots], ACTIVE[:, neuron]."""
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_h = tl.arange(0, BLOCK_H)
    row_ptr = neuron[:, None].to(tl.int64) * stride_wi                         # [BI, 1]
    acc_g = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + offs_h
        mask_h = hh < H
        x = tl.load(X + offs_t[:, None] * stride_xt + hh[None, :],
                    mask=mask_t[:, None] & mask_h[None, :], other=0.0)         # [BT, BH]
        wmask = live[:, None] & mask_h[None, :]
        wu = tl.load(WU + row_ptr + hh[None, :], mask=wmask, other=0.0)         # [BI, BH]
        if not GATE_GIVEN:
            wg = tl.load(WG + row_ptr + hh[None, :], mask=wmask, other=0.0)
        if USE_DOT:
            if DOT_FP32:
                xf = x.to(tl.float32)
                acc_u += tl.dot(xf, tl.trans(wu.to(tl.float32)), input_precision="ieee")
                if not GATE_GIVEN:
                    acc_g += tl.dot(xf, tl.trans(wg.to(tl.float32)), input_precision="ieee")
            else:
                acc_u += tl.dot(x.to(wu.dtype), tl.trans(wu))
                if not GATE_GIVEN:
                    acc_g += tl.dot(x.to(wg.dtype), tl.trans(wg))
        else:
            xf = x.to(tl.float32)[:, None, :]                                 # [BT, 1, BH]
            acc_u += tl.sum(xf * wu.to(tl.float32)[None, :, :], axis=2)
            if not GATE_GIVEN:
                acc_g += tl.sum(xf * wg.to(tl.float32)[None, :, :], axis=2)
    mask_ti = mask_t[:, None] & live[None, :]
    if GATE_GIVEN:
        a = tl.load(GATE + offs_t[:, None] * stride_gt + neuron[None, :], mask=mask_ti,
                    other=0.0)                                                 # [BT, BI] fp32
    else:
        a = activate_gate(acc_g, threshold, ACT)
    u = acc_u
    if ACT == 2:
        u = tl.maximum(u, 0.0)
    pred = tl.load(PRED + offs_t[:, None] * stride_pt + neuron[None, :], mask=mask_ti,
                   other=0) != 0                                               # [BT, BI]
    h = tl.where(pred, a * u, 0.0)
    tl.store(HC + offs_t[:, None] * stride_ht + slots[None, :], h, mask=mask_ti)
    tl.store(ACTIVE + offs_t[:, None] * stride_at + neuron[None, :], (h != 0.0).to(tl.int8),
             mask=mask_ti)


@triton.jit
def _gate_up_kernel(
    X, WG, WU, GATE, PRED, IDX, COUNT, HC, ACTIVE,
    T, H, I, threshold,
    stride_xt, stride_wi, stride_gt, stride_pt, stride_ht, stride_at,
    ACT: tl.constexpr, GATE_GIVEN: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Program p takes slot blocks p, p + num_programs, ... up to COUNT (a grid of a few programs
    # per SM, as _gate_up_counted_kernel's; or one program per block of the whole layer).
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_I
    slots = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    # NOTE: the first block's list is loaded before COUNT arrives (both loads in flight at once:
    # one memory round trip at the head instead of two); the slots past COUNT hold stale ids, so
    # an id is used only where its slot is live.
    listed = tl.load(IDX + slots, mask=slots < I, other=0)                     # [BI]
    count = tl.load(COUNT)
    if pid * BLOCK_I >= count:
        return
    live = slots < count
    _gate_up_rows(X, WG, WU, GATE, PRED, HC, ACTIVE, tl.where(live, listed, 0), live, slots,
                  T, H, threshold, stride_xt, stride_wi, stride_gt, stride_pt, stride_ht,
                  stride_at, ACT, GATE_GIVEN, USE_DOT, DOT_FP32, BLOCK_T, BLOCK_I, BLOCK_H)
    for s0 in range(pid * BLOCK_I + step, count, step):
        slots = s0 + tl.arange(0, BLOCK_I)
        live = slots < count
        neuron = tl.load(IDX + slots, mask=live, other=0)                     # [BI]
        _gate_up_rows(X, WG, WU, GATE, PRED, HC, ACTIVE, neuron, live, slots, T, H, threshold,
                      stride_xt, stride_wi, stride_gt, stride_pt, stride_ht, stride_at, ACT,
                      GATE_GIVEN, USE_DOT, DOT_FP32, BLOCK_T, BLOCK_I, BLOCK_H)


@triton.jit
def _group_ends(GROUP_COUNTS, num_groups, GROUPS_POW2: tl.constexpr):
    """The predictor's per-group counts [GROUPS_POW2] (0 past num_groups), their running sums
    (the slot after each group's last) and the listed count."""
    offs_g = tl.arange(0, GROUPS_POW2)
    per_group = tl.load(GROUP_COUNTS + offs_g, mask=offs_g < num_groups, other=0)
    return per_group, tl.cumsum(per_group, axis=0), tl.sum(per_group, axis=0)


@triton.jit
def _neurons_of_slots(PRED, slots, count, per_group, ends, T, I, stride_pt,
                      GROUP: tl.constexpr, GROUPS_POW2: tl.constexpr):
    """(neurons [BI], live [BI]) of compact slots `slots`: live where slot < count, neuron 0
    elsewhere; in ascending neuron order as _compact_kernel lists them. Slot s lies in the
    first group whose running count `ends` exceeds s, at rank s - (the count before that group)
    among the group's predicted neurons, found in the group's mask (L2-resident: just written
    by the predictor)."""
    live = slots < count
    offs_g = tl.arange(0, GROUPS_POW2)
    group = tl.sum((ends[None, :] <= slots[:, None]).to(tl.int32), axis=1)   # [BI]
    start = tl.sum(tl.where(offs_g[None, :] == group[:, None], (ends - per_group)[None, :], 0),
                   axis=1)                                                    # [BI]
    members = group[:, None] * GROUP + tl.arange(0, GROUP)[None, :]           # [BI, GROUP]
    predicted = _union_of_rows(PRED, members, live[:, None] & (members < I), T, stride_pt)
    ranks = tl.cumsum(predicted, axis=1)                                      # [BI, GROUP]
    neuron = group * GROUP + tl.sum((ranks <= (slots - start)[:, None]).to(tl.int32), axis=1)
    # NOTE: counts that are not the mask's would give ids past I; clamped, they read a wrong
    # row, never past the weights (a mask on `neuron < I` cost 13 registers a thread, and an
    # SM one program, under Triton 3.6)
    return tl.where(live, tl.minimum(neuron, I - 1), 0), live


@triton.jit
def _gate_up_counted_kernel(
    X, WG, WU, PRED, GROUP_COUNTS, IDX, COUNT, HC, ACTIVE,
    T, H, I, threshold, num_groups,
    stride_xt, stride_wi, stride_pt, stride_ht, stride_at,
    ACT: tl.constexpr, GROUP: tl.constexpr, GROUPS_POW2: tl.constexpr, CLEAR: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Predicted mode given the predictor's per-group counts: _gate_up_kernel's work plus the
    # compaction's, with no compaction launch. A fixed grid of programs (a few per SM, all
    # resident) takes slot blocks pid, pid + num_programs, ... up to COUNT: no program is
    # launched only to find it has nothing to do. Each program also zeroes ACTIVE for the
    # unpredicted neurons of its share [pid*CLEAR, +CLEAR) of the layer (the grid covers I).
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_I
    per_group, ends, count = _group_ends(GROUP_COUNTS, num_groups, GROUPS_POW2)
    # NOTE: the stores wait for the mask's loads, which are in flight with the counts' (one
    # memory round trip for both); here, not after the loop, nothing stays live across it.
    share = pid * CLEAR + tl.arange(0, CLEAR)
    in_share = share < I
    unpredicted = _union_of_rows(PRED, share, in_share, T, stride_pt) == 0     # [CLEAR]
    for t in range(0, T):
        tl.store(ACTIVE + t * stride_at + share, tl.zeros([CLEAR], dtype=tl.int8),
                 mask=in_share & unpredicted)
    tl.store(COUNT, count, mask=pid == 0)   # for the down kernel
    for s0 in range(pid * BLOCK_I, count, step):
        slots = s0 + tl.arange(0, BLOCK_I)
        neuron, live = _neurons_of_slots(PRED, slots, count, per_group, ends, T, I, stride_pt,
                                         GROUP, GROUPS_POW2)
        tl.store(IDX + slots, neuron, mask=live)   # for the down kernel
        _gate_up_rows(X, WG, WU, HC, PRED, HC, ACTIVE, neuron, live, slots,
                      T, H, threshold, stride_xt, stride_wi, 0, stride_pt, stride_ht, stride_at,
                      ACT, False, USE_DOT, DOT_FP32, BLOCK_T, BLOCK_I, BLOCK_H)


@triton.jit
def _gate_pass_kernel(
    X, WG, GATE, ALIVE,
    T, H, I, threshold,
    stride_xt, stride_wi, stride_gt, stride_at,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Exact mode's first pass: every gate row, streamed like a dense GEMV; writes the gate's
    # activation GATE [T, I] float32 and ALIVE [T, I] (activation != 0), which then plays the
    # predicted mask's part: only the alive neurons' up and down rows are read. Below
    # DOT_MIN_ROWS rows only (multiply-reduce in registers, no tl.dot).
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < I
    acc = linear_tile(X, WG, offs_i, mask_i, T, H, stride_xt, 1, stride_wi, 1,
                      False, False, BLOCK_T, BLOCK_I, BLOCK_H)                # [BT, BI]
    a = activate_gate(acc, threshold, ACT)
    mask_ti = mask_t[:, None] & mask_i[None, :]
    tl.store(GATE + offs_t[:, None] * stride_gt + offs_i[None, :], a, mask=mask_ti)
    tl.store(ALIVE + offs_t[:, None] * stride_at + offs_i[None, :], (a != 0.0).to(tl.int8),
             mask=mask_ti)


@triton.jit
def _down_rows(WD, neuron, live, offs_h, mask_h, stride_wi):
    """[BK, BH]: columns offs_h of W_down_t's rows `neuron` (where `live`)."""
    return tl.load(WD + neuron[:, None].to(tl.int64) * stride_wi + offs_h[None, :],
                   mask=live[:, None] & mask_h[None, :], other=0.0)


@triton.jit
def _down_accumulate(acc, HC, w, slots, live, offs_t, mask_t, stride_ht,
                     USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc [BT, BH] + HC[:, slots] [BT, BK] @ w [BK, BH]."""
    h = tl.load(HC + offs_t[:, None] * stride_ht + slots[None, :],
                mask=mask_t[:, None] & live[None, :], other=0.0)               # [BT, BK] fp32
    if USE_DOT:
        if DOT_FP32:
            acc += tl.dot(h, w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(h.to(w.dtype), w)
    else:
        acc += tl.sum(h[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _down_kernel(
    HC, WD, IDX, COUNT, PARTIAL, OUT, TICKETS,
    T, H, I,
    stride_ht, stride_wi, stride_ps, stride_pt, stride_ot,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, SPLIT: tl.constexpr,
    FUSED_REDUCE: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    # NOTE: the first step is taken before the loop, its slice of the list loaded with COUNT in
    # flight (one memory round trip at the head, not two; as in _gate_up_kernel, a stale id
    # past COUNT is used nowhere). Tiles with BLOCK_K * SPLIT >= COUNT do all their work here.
    slots = pid_s * BLOCK_K + offs_k
    listed = tl.load(IDX + slots, mask=slots < I, other=0)                     # [BK]
    count = tl.load(COUNT)
    live = slots < count
    w = _down_rows(WD, tl.where(live, listed, 0), live, offs_h, mask_h, stride_wi)  # [BK, BH]
    acc = _down_accumulate(acc, HC, w, slots, live, offs_t, mask_t, stride_ht, USE_DOT, DOT_FP32)
    for k0 in range((pid_s + SPLIT) * BLOCK_K, count, SPLIT * BLOCK_K):
        slots = k0 + offs_k
        live = slots < count
        neuron = tl.load(IDX + slots, mask=live, other=0)                      # [BK]
        w = _down_rows(WD, neuron, live, offs_h, mask_h, stride_wi)            # [BK, BH]
        acc = _down_accumulate(acc, HC, w, slots, live, offs_t, mask_t, stride_ht, USE_DOT,
                               DOT_FP32)
    tl.store(PARTIAL + pid_s * stride_ps + offs_t[:, None] * stride_pt + offs_h[None, :], acc,
             mask=mask_t[:, None] & mask_h[None, :])
    if FUSED_REDUCE:
        # NOTE: the threadfence-reduction pattern. The barrier puts every thread's partial stores
        # before the ticket; the ticket is acq_rel at GPU scope, so the program that draws the
        # last one sees every other split's partials. It sums them in split order (the same
        # result whichever program finishes last: deterministic) and resets the ticket for the
        # next call, so the counters need zeroing only once.
        tl.debug_barrier()
        ticket = tl.atomic_add(TICKETS + pid_h, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:
            offs_s = tl.arange(0, BLOCK_S)
            tile_mask = (offs_s < SPLIT)[:, None] & mask_h[None, :]
            for t in range(0, T):
                p = tl.load(PARTIAL + offs_s[:, None] * stride_ps + t * stride_pt + offs_h[None, :],
                            mask=tile_mask, other=0.0, cache_modifier=".cg")   # [BS, BH]
                tl.store(OUT + t * stride_ot + offs_h, tl.sum(p, axis=0).to(OUT.dtype.element_ty),
                         mask=mask_h)
            tl.store(TICKETS + pid_h, 0)

@triton.jit
def _reduce_kernel(PARTIAL, OUT, S, N, stride_ps, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    # NOTE: a [BLOCK_S, BLOCK_N] tile per step, so that all the partials' loads are in flight
    # at once (a loop of one load per partial waits for each in turn: ~0.7 us apiece).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_s = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + offs_s
        p = tl.load(PARTIAL + ss[:, None] * stride_ps + offs_n[None, :],
                    mask=(ss < S)[:, None] & mask_n[None, :], other=0.0)    # [BS, BN]
        acc += tl.sum(p, axis=0)
    tl.store(OUT + offs_n, acc.to(OUT.dtype.element_ty), mask=mask_n)


def reduce_partials(partial: Tensor, out: Tensor) -> None:
    """out (any float dtype, N elements, contiguous) = partial [S, N...] float32 summed over S,
    in a fixed order (deterministic)."""
    S = partial.shape[0]
    N = out.numel()
    block_s = min(next_pow2(S), 256)
    block_n = max(16, 8192 // block_s)
    _reduce_kernel[(triton.cdiv(N, block_n),)](partial, out, S, N, partial.stride(0),
                                              BLOCK_S=block_s, BLOCK_N=block_n)


# The widest block one compaction program loads at once (scan_block 0 means this, or I).
_COMPACT_MAX_BLOCK = 16384


def ffn_compact(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act_code: int,
                threshold: float, predicted: Tensor | None, dot_fp32: bool,
                config: CompactConfig | None = None,
                group_counts: Tensor | None = None,
                rows_read: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [T, H] contiguous; w_* [I, H] contiguous, one dtype; predicted [T, I] bool contiguous,
    or None for exact mode below DOT_MIN_ROWS rows (a dense pass over the gate rows finds the
    alive neurons first; more rows run the masked kernels, kernels/sparse_ffn_triton.py).
    group_counts: the predictor's per-group counts of `predicted` (sparse_ffn_ref.
    check_group_counts); given, the gate/up programs find their neurons from them and the
    compaction launch is skipped. rows_read (int64 [3], optional): receives the (gate, up,
    down) rows read, from COUNT on the device.

    Returns (out [T, H] in x.dtype, active [T, I] bool). Validation is the caller's
    (kernels/sparse_ffn_triton.py).
    """
    T, H = x.shape
    I = w_gate.shape[0]
    config = config or default_config(T)
    use_dot = T >= DOT_MIN_ROWS
    elsize = w_gate.element_size()
    block_t = dot_pad(next_pow2(T), use_dot)
    block_i = dot_pad(config.gate_block_i, use_dot)
    block_k = dot_pad(config.down_block_k, use_dot)
    gate_block_h = dot_k_tile(config.gate_block_h, use_dot, elsize)
    down_block_h = dot_k_tile(config.down_block_h, use_dot, elsize)
    dev = x.device
    gate = None
    if predicted is None:   # exact mode
        assert not use_dot, "exact mode from DOT_MIN_ROWS rows runs the masked kernels"
        gate = torch.empty(T, I, dtype=torch.float32, device=dev)        # [T, I] activation
        pred = torch.empty(T, I, dtype=torch.int8, device=dev)           # [T, I] alive
        _gate_pass_kernel[(triton.cdiv(I, config.gate_pass_block_i),)](
            x, w_gate, gate, pred, T, H, I, float(threshold),
            x.stride(0), w_gate.stride(0), gate.stride(0), pred.stride(0),
            ACT=act_code, BLOCK_T=block_t, BLOCK_I=config.gate_pass_block_i,
            BLOCK_H=config.gate_pass_block_h, num_warps=config.gate_pass_warps)
    else:
        pred = predicted.view(torch.int8)

    idx = torch.empty(I, dtype=torch.int32, device=dev)                 # [I] compact neuron ids
    count = torch.empty(1, dtype=torch.int32, device=dev)                # listed neurons
    active = torch.empty(T, I, dtype=torch.int8, device=dev)             # [T, I]
    hc = torch.empty(T, I, dtype=torch.float32, device=dev)              # [T, slot]
    counted = group_counts is not None
    if counted:
        _launch_gate_up_counted(x, w_gate, w_up, pred, group_counts, idx, count, hc, active,
                                act_code, threshold, use_dot, dot_fp32, block_t, block_i,
                                gate_block_h, config)
    else:
        scan = min(next_pow2(I), _COMPACT_MAX_BLOCK)
        scan_block = config.scan_block or scan
        _compact_kernel[(triton.cdiv(I, scan_block),)](
            pred, idx, count, active, T, I, pred.stride(0), active.stride(0),
            BLOCK=scan_block, SCAN=scan, num_warps=16 if scan_block == scan else 8)
        gate_arg = hc if gate is None else gate   # (not read unless the gate was given)
        _gate_up_kernel[(_gate_up_programs(I, block_i, config, dev),)](
            x, w_gate, w_up, gate_arg, pred, idx, count, hc, active,
            T, H, I, float(threshold), x.stride(0), w_gate.stride(0), gate_arg.stride(0),
            pred.stride(0), hc.stride(0), active.stride(0),
            ACT=act_code, GATE_GIVEN=gate is not None, USE_DOT=use_dot, DOT_FP32=dot_fp32,
            BLOCK_T=block_t, BLOCK_I=block_i, BLOCK_H=gate_block_h,
            num_warps=config.gate_warps, num_stages=config.gate_stages)
    split = config.down_split
    num_col_blocks = triton.cdiv(H, down_block_h)
    partial = torch.empty(split, T, H, dtype=torch.float32, device=dev)  # [S, T, H]
    out = torch.empty(T, H, dtype=x.dtype, device=dev)                   # [T, H]
    fused = config.down_fused_reduce
    tickets = _tickets(dev, num_col_blocks) if fused else count          # (unused if not fused)
    _down_kernel[(num_col_blocks, split)](
        hc, w_down_t, idx, count, partial, out, tickets,
        T, H, I, hc.stride(0), w_down_t.stride(0), partial.stride(0), partial.stride(1),
        out.stride(0),
        USE_DOT=use_dot, DOT_FP32=dot_fp32, SPLIT=split, FUSED_REDUCE=fused,
        BLOCK_S=next_pow2(split), BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_H=down_block_h,
        num_warps=config.down_warps, num_stages=config.down_stages)
    if not fused:
        reduce_partials(partial, out)
    if rows_read is not None:
        rows_read.copy_(count.expand(3))                # the listed neurons' three rows
        if gate is not None:                            # exact mode: the dense gate pass
            rows_read[0].fill_(I)
    return out, active.view(torch.bool)


def _launch_gate_up_counted(x: Tensor, w_gate: Tensor, w_up: Tensor, pred: Tensor,
                            group_counts: Tensor, idx: Tensor, count: Tensor, hc: Tensor,
                            active: Tensor, act_code: int, threshold: float, use_dot: bool,
                            dot_fp32: bool, block_t: int, block_i: int, block_h: int,
                            config: CompactConfig) -> None:
    """_gate_up_counted_kernel over ffn_compact's buffers (shapes as there)."""
    T, H = x.shape
    I = w_gate.shape[0]
    group, num_groups = prediction_groups(I)
    programs = _gate_up_programs(I, block_i, config, x.device)
    _gate_up_counted_kernel[(programs,)](
        x, w_gate, w_up, pred, group_counts, idx, count, hc, active,
        T, H, I, float(threshold), num_groups,
        x.stride(0), w_gate.stride(0), pred.stride(0), hc.stride(0), active.stride(0),
        ACT=act_code, GROUP=group, GROUPS_POW2=next_pow2(num_groups),
        CLEAR=next_pow2(triton.cdiv(I, programs)), USE_DOT=use_dot, DOT_FP32=dot_fp32,
        BLOCK_T=block_t, BLOCK_I=block_i, BLOCK_H=block_h,
        num_warps=config.gate_warps, num_stages=config.gate_stages)


def _gate_up_programs(I: int, block_i: int, config: CompactConfig, device: torch.device) -> int:
    """The gate/up grid: config.gate_programs_per_sm programs per SM taking slot blocks in
    turn, or (0) one program per slot block of the whole layer."""
    blocks = triton.cdiv(I, block_i)
    if not config.gate_programs_per_sm:
        return blocks
    return min(blocks, config.gate_programs_per_sm * _num_sms(device))


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter: a small grid,
    so that tests run several slot blocks per program)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sms(index)


@functools.cache
def _cuda_sms(index: int) -> int:
    # NOTE: cached: every FFN call of every layer asks (the decode hot path), and the answer
    # never changes
    return torch.cuda.get_device_properties(index).multi_processor_count


# Ticket counters of the fused reduction, per device: zeroed once, and every call leaves them
# at zero again (the last program of a column block resets its own).
_TICKETS: dict[torch.device, Tensor] = {}


def _tickets(device: torch.device, n: int) -> Tensor:
    # NOTE: one buffer per device: calls that run concurrently on two streams of one device would
    # share counters (the engine runs one forward pass at a time). A buffer first made inside a
    # CUDA-graph capture would be zeroed only when the graph replays, so that is refused.
    buf = _TICKETS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the fused reduction's counters are made on the first call: "
                               "call the FFN once before capturing it in a CUDA graph")
        buf = _TICKETS[device] = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
    return buf
