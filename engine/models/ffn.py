"""The gated FFN in its four flavours, with optional activation predictor and neuron counting.

A neuron i is row i of gate_proj and up_proj and column i of down_proj. It is *active* for a
token iff its intermediate value h_i != 0 after the activation (and, with a predictor, iff it was
also predicted active): the one definition, turned into params and sparsity by
engine/core/sparsity.py. Besides, each forward reports the weight rows its path read (the kernel
that ran says which; docs/SPARSITY.md) and the predictor weights it read. Counts stay on the
device (no host sync per layer); the model runner reads them once per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sparse_serve.kernels.sparse_ffn import group_counts_for, predict_active, sparse_ffn
from sparse_serve.kernels.sparse_ffn_ref import RowScales, dense_ffn, predict_active_ref


class Predictor(nn.Module):
    """TurboSparse/Deja Vu low-rank predictor: neuron i fires iff fc2(relu(fc1(x)))_i > threshold."""

    def __init__(self, hidden_size: int, intermediate_size: int, rank: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, rank, bias=False)
        self.fc2 = nn.Linear(rank, intermediate_size, bias=False)
        # int8 weights (engine/models/quantized.py): fc1/fc2 hold int8 rows and these their
        # fp32 scales ([r], [I]); None for float weights
        self.register_buffer("fc1_scale", None, persistent=False)
        self.register_buffer("fc2_scale", None, persistent=False)

    @property
    def num_params(self) -> int:
        """Parameters one call reads: every call reads all of fc1 and fc2."""
        return self.fc1.weight.numel() + self.fc2.weight.numel()

    def forward(self, x: torch.Tensor, threshold: float, use_kernel: bool = True,
                group_counts: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, H] residual stream before the post-attention norm -> [T, I] bool.
        group_counts (kernel path only): filled as kernels.sparse_ffn.predict_active does."""
        scales = None if self.fc1_scale is None else (self.fc1_scale, self.fc2_scale)
        if use_kernel:
            return predict_active(x, self.fc1.weight, self.fc2.weight, threshold, group_counts, scales)
        assert group_counts is None, "the reference path does not count groups"
        return predict_active_ref(x, self.fc1.weight, self.fc2.weight, threshold, scales)


@dataclass
class FFNActivity:
    """Per-layer counts for one forward: tensors on the device, host ints where known up front."""
    # the fields with one entry per token (CUDA-graph padding rows are cut from these only)
    PER_TOKEN: ClassVar[tuple[str, ...]] = ("active_counts",)
    active_counts: torch.Tensor            # [T] int32: active neurons per token
    # [3] int64: gate, up and down weight rows (`hidden` params each) this forward read, as the
    # kernel path that ran reported them (plus the dense pass of a shadow check).
    rows_read: torch.Tensor
    predictor_params_read: int = 0         # the predictor's weights, when it ran (all of them)
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
        # int8 weights (engine/models/quantized.py): gate/up/w_down_t hold int8 and these their
        # fp32 scales (gate, up [I] per neuron; down [H] per hidden channel); None for float weights
        self.register_buffer("gate_scale", None, persistent=False)
        self.register_buffer("up_scale", None, persistent=False)
        self.register_buffer("down_scale", None, persistent=False)
        self.x_bits = 16   # the grid of x for the int8 gate and up products (kernels/activation_grid.py)

    def prepare_for_inference(self) -> None:
        """Store down_proj transposed ([I, H]: a neuron's column is one contiguous row) and
        drop the original, so sparse kernels read only active neurons' rows."""
        self.w_down_t = self.down_proj.weight.detach().t().contiguous()
        del self.down_proj

    @property
    def row_scales(self) -> RowScales | None:
        """The int8 weights' per-row scales, or None for float weights."""
        if self.gate_scale is None:
            return None
        return RowScales(self.gate_scale, self.up_scale, self.down_scale, self.x_bits)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, FFNActivity]:
        """x: [T, H] normed input; residual: [T, H] stream before the norm (predictor input)."""
        predicted = group_counts = None
        if self.predictor is not None and self.use_predictor:
            if self.use_sparse_kernels:
                # the CUDA predictor counts its neurons per group, and the FFN kernels skip their
                # compaction launch (kernels/ffn_triton_compact.py); None where nothing uses them
                group_counts = group_counts_for(x, self.gate_proj.out_features)
            predicted = self.predictor(residual, self.predictor_threshold,
                                       use_kernel=self.use_sparse_kernels,
                                       group_counts=group_counts)                    # [T, I] bool
        w_down_t = self.w_down_t if self.w_down_t is not None else self.down_proj.weight.t()
        args = (x, self.gate_proj.weight, self.up_proj.weight, w_down_t, self.act, self.act_threshold)
        rows_read = torch.empty(3, dtype=torch.int64, device=x.device)   # gate, up, down rows
        row_scales = self.row_scales
        if self.use_sparse_kernels:
            out, active = sparse_ffn(*args, predicted=predicted,
                                     dense_fallback_fraction=self.dense_fallback_fraction,
                                     predicted_group_counts=group_counts, rows_read=rows_read,
                                     row_scales=row_scales)
        else:   # the plain eager path: every weight read, same math
            out, active = dense_ffn(*args, predicted=predicted, rows_read=rows_read, row_scales=row_scales)
        activity = FFNActivity(active_counts=active.sum(dim=-1, dtype=torch.int32),
                               rows_read=rows_read,
                               predictor_params_read=self.predictor.num_params if predicted is not None else 0)
        if self.shadow_check and predicted is not None:
            # NOTE: the check is a second, dense pass over the layer: its reads are the step's too.
            shadow_read = torch.empty(3, dtype=torch.int64, device=x.device)
            _, exact = dense_ffn(*args, predicted=None, rows_read=shadow_read, row_scales=row_scales)
            activity.rows_read = rows_read + shadow_read
            hits = (exact & predicted).sum().float()
            activity.shadow_recall = hits / exact.sum().clamp(min=1)
            activity.shadow_precision = hits / predicted.sum().clamp(min=1)
        return out, activity

