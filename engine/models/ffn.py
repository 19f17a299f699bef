"""The gated FFN in its four flavours, with optional activation predictor and neuron counting.

A neuron i is row i of gate_proj and up_proj and column i of down_proj. It is *active* for a
token iff its intermediate value h_i != 0 after the activation (and, with a predictor, iff it was
also predicted active): the one definition in DESIGN.md. Counts stay on the device (no host sync
per layer); the model runner reads them once per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Predictor(nn.Module):
    """TurboSparse/Deja Vu low-rank predictor: neuron i fires iff fc2(relu(fc1(x)))_i > threshold."""

    def __init__(self, hidden_size: int, intermediate_size: int, rank: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, rank, bias=False)
        self.fc2 = nn.Linear(rank, intermediate_size, bias=False)

    def forward(self, x: torch.Tensor, threshold: float, use_kernel: bool = True) -> torch.Tensor:
        """x: [T, H] residual stream before the post-attention norm -> [T, I] bool."""
        if use_kernel:
            from kernels.sparse_ffn import predict_active
            return predict_active(x, self.fc1.weight, self.fc2.weight, threshold)
        return self.fc2(F.relu(self.fc1(x))) > threshold


@dataclass
class FFNActivity:
    """Per-layer counts for one forward, all on the device."""
    active_counts: torch.Tensor            # [T] int32: active neurons per token
    union_count: torch.Tensor              # [] int64: neurons active for any token (what the batch computed)
    shadow_recall: torch.Tensor | None = None     # [] float32, predictor vs exact (shadow steps only)
    shadow_precision: torch.Tensor | None = None


class SparseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str, act_threshold: float,
                 predictor_rank: int | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = act
        # fatrelu: active iff gate > threshold; silu: CATS threshold on |silu(gate)| (0 = dense SwiGLU)
        self.act_threshold = float(act_threshold)
        self.predictor = Predictor(hidden_size, intermediate_size, predictor_rank) if predictor_rank else None
        self.use_predictor = self.predictor is not None
        self.predictor_threshold = 0.0
        self.use_sparse_kernels = True
        self.dense_fallback_fraction: float | None = None
        self.shadow_check = False          # set by the runner on sampled steps
        # [I, H], filled by prepare_for_inference(); a buffer so .to() moves it
        self.register_buffer("w_down_t", None, persistent=False)

    def prepare_for_inference(self) -> None:
        """Store down_proj transposed ([I, H]: a neuron's column is one contiguous row) and
        drop the original, so sparse kernels read only active neurons' rows."""
        self.w_down_t = self.down_proj.weight.detach().t().contiguous()
        del self.down_proj

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, FFNActivity]:
        """x: [T, H] normed input; residual: [T, H] stream before the norm (predictor input)."""
        predicted = None
        if self.predictor is not None and self.use_predictor:
            predicted = self.predictor(residual, self.predictor_threshold,
                                       use_kernel=self.use_sparse_kernels)           # [T, I] bool
        w_down_t = self.w_down_t if self.w_down_t is not None else self.down_proj.weight.t()
        args = (x, self.gate_proj.weight, self.up_proj.weight, w_down_t, self.act, self.act_threshold)
        if self.use_sparse_kernels:
            from kernels.sparse_ffn import sparse_ffn
            out, active = sparse_ffn(*args, predicted=predicted,
                                     dense_fallback_fraction=self.dense_fallback_fraction)
        else:
            out, active = ffn_reference(*args, predicted=predicted)
        activity = FFNActivity(active_counts=active.sum(dim=-1, dtype=torch.int32),
                               union_count=active.any(dim=0).sum())
        if self.shadow_check and predicted is not None:
            _, exact = ffn_reference(*args, predicted=None)
            hits = (exact & predicted).sum().float()
            activity.shadow_recall = hits / exact.sum().clamp(min=1)
            activity.shadow_precision = hits / predicted.sum().clamp(min=1)
        return out, activity


def activation(g: torch.Tensor, u: torch.Tensor, act: str, threshold: float) -> torch.Tensor:
    """h from gate and up pre-activations, [T, I] each."""
    if act == "silu":
        s = F.silu(g)
        if threshold > 0.0:
            s = torch.where(s.abs() > threshold, s, torch.zeros_like(s))
        return s * u
    if act == "relu":
        return F.relu(g) * u
    if act == "drelu":
        return F.relu(g) * F.relu(u)
    if act == "fatrelu":
        return torch.where(g > threshold, g, torch.zeros_like(g)) * u
    raise ValueError(f"unknown FFN activation {act!r}")


def ffn_reference(x, w_gate, w_up, w_down_t, act: str, threshold: float = 0.0,
                  predicted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense eager FFN: (out [T, H], active [T, I] bool). The model's own definition of the math."""
    h = activation(x @ w_gate.t(), x @ w_up.t(), act, threshold)                  # [T, I]
    if predicted is not None:
        h = torch.where(predicted, h, torch.zeros_like(h))
    return h @ w_down_t, h != 0
