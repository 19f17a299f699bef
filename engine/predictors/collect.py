"""Training data for activation predictors: per layer, the residual stream a predictor reads
(before the post-attention norm) and which neurons were active for that token.

"Active" is the model's own definition (kernels/sparse_ffn_ref.py: h != 0 after the activation
and its threshold), so a predictor learns exactly what the FFN would compute: gate > 0 for
ReLU, gate and up > 0 for dReLU, gate > threshold for FATReLU, |silu(gate)| > the calibrated
threshold for a SwiGLU model with a sparsity sidecar. The model runs exactly (no predictor)
while it is observed, with whatever thresholds it was loaded with.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparse_serve.engine.calibration.perplexity import batches, forward_windows
from sparse_serve.kernels.sparse_ffn_ref import dense_ffn


@dataclass
class LayerSamples:
    inputs: torch.Tensor     # [N, H] float32: residual stream before the post-attention norm
    active: torch.Tensor     # [N, I] bool: the neuron's exact activity for that token

    @property
    def num_tokens(self) -> int:
        return self.inputs.shape[0]

    @property
    def density(self) -> float:
        return float(self.active.float().mean())


def exact_activity(mlp, x: torch.Tensor) -> torch.Tensor:
    """[T, I] bool: which neurons the layer's FFN computes as nonzero for normed input x [T, H]."""
    w_down_t = mlp.w_down_t if mlp.w_down_t is not None else mlp.down_proj.weight.t()
    _, active = dense_ffn(x, mlp.gate_proj.weight, mlp.up_proj.weight, w_down_t, mlp.act,
                          mlp.act_threshold, predicted=None)
    return active


@torch.inference_mode()
def collect(model, windows: Sequence[torch.Tensor], tokens_per_batch: int = 2048) -> list[LayerSamples]:
    """Run the model exactly over the windows and keep, for every layer and token, the
    predictor's input and the exact activity."""
    mlps = model.mlps
    inputs: list[list[torch.Tensor]] = [[] for _ in mlps]
    active: list[list[torch.Tensor]] = [[] for _ in mlps]
    saved = [mlp.use_predictor for mlp in mlps]

    def make_hook(layer: int):
        def hook(mlp, args):
            x, residual = args
            inputs[layer].append(residual.float().cpu())
            active[layer].append(exact_activity(mlp, x).cpu())
        return hook

    hooks = [mlp.register_forward_pre_hook(make_hook(i)) for i, mlp in enumerate(mlps)]
    try:
        for mlp in mlps:
            mlp.use_predictor = False
        for group in batches(windows, tokens_per_batch):
            forward_windows(model, group)
    finally:
        for hook in hooks:
            hook.remove()
        for mlp, use in zip(mlps, saved):
            mlp.use_predictor = use
    return [LayerSamples(torch.cat(x), torch.cat(a)) for x, a in zip(inputs, active)]
