"""The independent count: which weight rows each FFN path must read, from the kernel's inputs.

Computed in float64 from x, the weights, the activation and the predicted mask, never from what
a kernel returns. For a neuron i (over the batch's rows):
    P  candidates: predicted in some row (every neuron in exact mode)
    S  its gate survived the activation in some row where it was a candidate
    A  h != 0 in some row (active)
and per path (docs/SPARSITY.md#rows-read-by-each-path) which of these sets its gate, up and down
rows are. The native CPU kernel also prefetches rows ahead of use (a prefetch moves the row like
a load does, so it counts); `native_rows` replays its order of visits to find those rows.

The poison helper NaN-fills the rows outside the expected sets: a path that read (used) any of
them would give a non-finite or different output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Inputs must sit this far from the activation's decision boundary (and |u| this far from 0),
# so that float32 kernels and this float64 count cannot disagree on which neurons fire.
MARGIN = 2e-5


@dataclass
class Neurons:
    candidate: torch.Tensor     # [T, I] bool
    alive: torch.Tensor         # [T, I] bool: gate survived (and candidate)
    active: torch.Tensor        # [T, I] bool: h != 0 (and candidate)

    @property
    def P(self) -> torch.Tensor:
        return self.candidate.any(0)

    @property
    def S(self) -> torch.Tensor:
        return self.alive.any(0)

    @property
    def A(self) -> torch.Tensor:
        return self.active.any(0)


def neurons(x, w_gate, w_up, act: str, threshold: float, predicted=None) -> Neurons:
    """Which neurons are candidates, alive and active, from the inputs in float64; fails if an
    input sits within MARGIN of a decision (choose another seed)."""
    xd = x.double()
    g = xd @ w_gate.double().t()                                  # [T, I]
    u = xd @ w_up.double().t()                                    # [T, I]
    if act == "silu":
        s = F.silu(g)
        boundary = s.abs() - threshold
    elif act == "fatrelu":
        boundary = g - threshold
    else:                                                         # relu, drelu
        boundary = g
    candidate = torch.ones_like(g, dtype=torch.bool) if predicted is None else predicted.clone()
    alive = (boundary > 0) & candidate
    assert boundary[candidate].abs().min() > MARGIN, "an input sits on the activation's boundary"
    assert u[alive].abs().min() > MARGIN if alive.any() else True, "an up value sits at 0"
    up_ok = u > 0 if act == "drelu" else u != 0
    active = alive & up_ok
    return Neurons(candidate, alive, active)


def dense_rows(n: Neurons) -> list[int]:
    I = n.candidate.shape[1]
    return [I, I, I]


def gathered_rows(n: Neurons, exact: bool) -> list[int]:
    """torch gather path and Triton compact kernels: predicted mode the union's three rows;
    exact mode every gate row, then the alive neurons' up and down rows."""
    I = n.candidate.shape[1]
    if exact:
        return [I, int(n.S.sum()), int(n.S.sum())]
    return [int(n.P.sum())] * 3


def masked_rows(n: Neurons) -> list[int]:
    """Triton masked kernels (exact mode from DOT_MIN_ROWS rows)."""
    return [n.candidate.shape[1], int(n.S.sum()), int(n.A.sum())]


def native_rows(n: Neurons, act: str, predicted: bool, H: int, prefetches: bool,
                row_chunk: int) -> list[torch.Tensor]:
    """[gate, up, down] bool [I] masks of rows the native CPU kernel reads or prefetches
    (kernels/csrc/sparse_ffn_cpu.cpp: the order of visits and prefetch hints as written there)."""
    T, I = n.candidate.shape
    dot_prefetch = prefetches and H >= 16        # dot_rows' AVX2 loop steps 16 elements
    axpy_prefetch = prefetches and H >= 8        # axpy_rows' AVX2 loop steps 8
    gate, up, down = n.P.clone(), n.S.clone(), n.A.clone()
    if T > 1:
        if predicted and dot_prefetch:          # the gate pass fetches the up row ahead
            up |= n.P
        return [gate, up, down]
    if not predicted:
        if act != "drelu" and dot_prefetch:     # the up pass fetches the down row ahead
            down |= n.S
        return [gate, up, down]
    if dot_prefetch:                            # the gate pass fetches the down row ahead
        down |= n.P
    for start in range(0, I, row_chunk):
        ids = [i for i in range(start, min(start + row_chunk, I)) if n.P[i]]
        if ids:
            up[ids[0]] = True                   # the chunk's first up row, fetched at its head
        if axpy_prefetch:                       # after an active neuron, the next one's up row
            for k, i in enumerate(ids[:-1]):
                if n.A[i]:
                    up[ids[k + 1]] = True
    return [gate, up, down]


def poison_outside(weights, read_masks) -> list[torch.Tensor]:
    """Copies of (w_gate, w_up, w_down_t) with every row outside its read mask set to NaN."""
    out = []
    for w, mask in zip(weights, read_masks):
        w = w.clone()
        w[~mask.to(w.device)] = float("nan")
        out.append(w)
    return out


def masks_of(counts_kind: str, n: Neurons) -> list[torch.Tensor]:
    """The [gate, up, down] read masks behind gathered_rows / masked_rows / dense_rows."""
    I = n.candidate.shape[1]
    every = torch.ones(I, dtype=torch.bool)
    if counts_kind == "dense":
        return [every, every, every]
    if counts_kind == "gathered_exact":
        return [every, n.S, n.S]
    if counts_kind == "gathered_predicted":
        return [n.P, n.P, n.P]
    if counts_kind == "masked":
        return [every, n.S, n.A]
    raise ValueError(counts_kind)
