"""Pure-torch references for the sparse FFN and the activation predictor.

These define the semantics every fast path is tested against. They compute in float32 from the
stored weights (whatever their dtype) and return the output in the input's dtype. They also run
on any device, so they double as the dense path of last resort.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_serve.kernels.activation_grid import on_grid
from sparse_serve.kernels.activations import check_act
from sparse_serve.kernels.int4_rows import int8_values, is_packed


class RowScales(NamedTuple):
    """fp32 scales of int8 FFN weights (w_gate, w_up, w_down_t all int8 [I, H], or all 4-bit rows
    with the same int8 values: kernels/int4_rows.py):
    gate [I] and up [I] per neuron row; down [H] per hidden channel, i.e. per column of w_down_t
    (down_proj's output channels: a neuron's down row spans the residual stream's outlier
    channels, which would set a per-row scale; docs/benchmarks/quantization.md). 4-bit rows take
    down [I] per neuron row instead (each group of 32 channels has its own multiplier there, and
    per row measured better), folded into h before the down products."""
    gate: Tensor
    up: Tensor
    down: Tensor
    x_bits: int = 16   # the grid x is put on for the gate and up products (kernels/activation_grid.py)


def apply_activation(g: Tensor, u: Tensor, act: str, threshold: float) -> Tensor:
    """h for gate pre-activations g and up projections u (same shape, any float dtype)."""
    check_act(act)
    if act == "silu":
        s = F.silu(g)
        return torch.where(s.abs() > threshold, s, torch.zeros_like(s)) * u
    if act == "relu":
        return torch.relu(g) * u
    if act == "drelu":
        return torch.relu(g) * torch.relu(u)
    return torch.where(g > threshold, g, torch.zeros_like(g)) * u  # fatrelu


def dequantize(w: Tensor, scale: Tensor | None, dim: int = 0, k: int | None = None) -> Tensor:
    """w [N, K] as float32: int8 times its fp32 scales along `dim` (0: one per row [N], 1: one
    per column [K]; int8 weights, or 4-bit rows of k weights decoded to their int8 values), else w."""
    if scale is None:
        return w.float()
    w = int8_values(w, k)
    assert w.dtype == torch.int8 and scale.shape == w.shape[dim:dim + 1], (w.dtype, w.shape, scale.shape)
    return w.float() * (scale.float()[:, None] if dim == 0 else scale.float()[None, :])


def sparse_ffn_ref(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act: str,
                   threshold: float = 0.0, predicted: Tensor | None = None,
                   row_scales: RowScales | None = None) -> tuple[Tensor, Tensor]:
    """(out [T, H] in x.dtype, active [T, I] bool); see kernels/sparse_ffn.py for the contract.
    row_scales: the per-row scales of int8 weights (each weight is dequantized first, x rounded
    to its x_bits grid for the gate and up products and, for 2+ rows, h to its 16-bit grid for
    the down products, as the int8 kernels read them; 4-bit rows as the int8 values they hold)."""
    sg, su, sd, x_bits = row_scales if row_scales is not None else (None, None, None, None)
    xf = x.float() if row_scales is None else on_grid(x, x_bits)   # [T, H]
    H = x.shape[1]
    g = xf @ dequantize(w_gate, sg, k=H).t()         # [T, I]
    u = xf @ dequantize(w_up, su, k=H).t()           # [T, I]
    h = apply_activation(g, u, act, threshold)       # [T, I]
    if predicted is not None:
        h = torch.where(predicted, h, torch.zeros_like(h))
    active = h != 0
    if row_scales is not None and is_packed(w_down_t):
        h = h * sd.float()[None, :]                  # per-neuron down scales, folded into h
        w_down, sd = int8_values(w_down_t, H), None
    else:
        w_down = w_down_t
    if row_scales is not None and h.shape[0] > 1:
        # int8 down rows read h on its 16-bit grid too where 2+ rows run (the kernel's pair tiles);
        # one row (a batch-1 decode step) streams each active down row in fp32
        h = on_grid(h)
    out = h @ (w_down.float() if sd is None else dequantize(w_down, sd, dim=1))   # [T, H]
    return out.to(x.dtype), active


def dense_ffn(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, act: str,
              threshold: float = 0.0, predicted: Tensor | None = None,
              rows_read: Tensor | None = None,
              row_scales: RowScales | None = None) -> tuple[Tensor, Tensor]:
    """The dense fallback: every weight read once with the BLAS of the weights' dtype.

    Same semantics as the reference, but computed in the weights' dtype (no float32 copies of
    the weights), so it is what the dispatcher uses when most neurons are active. rows_read
    (int64 [3], optional) receives the (gate, up, down) rows read: all I of each.
    int8 weights (row_scales given) have no BLAS: they go through the reference, which
    dequantizes every weight (correct, slow: the serving path never takes it, see
    kernels/sparse_ffn.py).
    """
    if rows_read is not None:
        rows_read.fill_(w_gate.shape[0])
    if row_scales is not None:
        return sparse_ffn_ref(x, w_gate, w_up, w_down_t, act, threshold, predicted, row_scales)
    xw = x.to(w_gate.dtype)
    g = F.linear(xw, w_gate)                         # [T, I]
    u = F.linear(xw, w_up)                           # [T, I]
    h = apply_activation(g, u, act, threshold)       # [T, I]
    if predicted is not None:
        h = torch.where(predicted, h, torch.zeros_like(h))
    active = h != 0
    out = h @ w_down_t                               # [T, H]
    return out.to(x.dtype), active


# Predicted neurons counted per group of consecutive neurons: the CUDA predictor does it in the
# epilogue of its second launch, and the CUDA FFN then finds the listed neurons from these counts
# (kernels/ffn_triton_compact.py) instead of compacting the mask in a launch of its own.
PREDICTION_GROUP = 128          # neurons per group; doubled until there are at most ...
MAX_PREDICTION_GROUPS = 256     # ... this many groups (each FFN program scans all the counts)


def prediction_groups(I: int) -> tuple[int, int]:
    """(neurons per group, number of groups) of a layer of I neurons."""
    group = PREDICTION_GROUP
    while -(-I // group) > MAX_PREDICTION_GROUPS:
        group *= 2
    return group, -(-I // group)


def check_group_counts(group_counts: Tensor, I: int) -> None:
    """ValueError unless group_counts is a buffer for the counts of a layer of I neurons:
    contiguous int32 [groups of prediction_groups(I)]."""
    groups = prediction_groups(I)[1]
    if (group_counts.shape != (groups,) or group_counts.dtype != torch.int32
            or not group_counts.is_contiguous()):
        raise ValueError(f"group counts must be contiguous int32 [{groups}], got "
                         f"{group_counts.dtype} {tuple(group_counts.shape)}")


def group_counts_ref(predicted: Tensor) -> Tensor:
    """[groups] int32: per group of prediction_groups(I), the neurons that some row of
    predicted [T, I] bool selects (the batch's union)."""
    I = predicted.shape[1]
    group, groups = prediction_groups(I)
    union = F.pad(predicted.any(0).to(torch.int32), (0, group * groups - I))   # [groups * group]
    return union.view(groups, group).sum(1, dtype=torch.int32)


def predict_active_ref(x: Tensor, fc1: Tensor, fc2: Tensor, threshold: float = 0.0,
                       scales: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """[T, I] bool: fc2(relu(fc1 x)) > threshold, computed in float32. scales: the per-row fp32
    scales ([r], [I]) of int8 fc1 and fc2."""
    s1, s2 = scales if scales is not None else (None, None)
    z = torch.relu(x.float() @ dequantize(fc1, s1).t())   # [T, r]
    return (z @ dequantize(fc2, s2).t()) > threshold      # [T, I]
