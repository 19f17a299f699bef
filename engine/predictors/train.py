"""Train one layer's low-rank activation predictor: logit = fc2(relu(fc1(x))), no bias, neuron
active iff logit > threshold (the TurboSparse / Deja Vu form the server runs).

Initialisation. For ReLU-family and thresholded SwiGLU models a neuron fires (mostly) when its
gate pre-activation is large, and the gate reads norm(x) = x / rms(x) * w, whose sign is the sign
of x . (w * W_gate[i]). With W = W_gate diag(w) ~ U S V^T truncated to r = rank / 2 directions,
fc1 = [V^T; -V^T] and fc2 = [U S, -U S] give fc2(relu(fc1 x)) = U S V^T x exactly (relu(z) -
relu(-z) = z): the best rank-r linear guess of the gate. Training then fits the real targets
(dReLU's second condition, thresholds, what the truncation lost) with a weighted
binary cross-entropy: `recall_weight` > 1 charges a missed active neuron more than a wasted one,
since a miss changes the output and a false alarm only costs bandwidth.

Inputs are divided by their RMS over the training tokens during training (better conditioned
steps); the scale is folded into fc1 when the weights are returned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_serve.engine.predictors.collect import LayerSamples

INIT_LOGIT_STD = 3.0


@dataclass
class TrainSettings:
    rank: int
    steps: int = 400                # optimizer steps per layer (batches drawn over shuffled epochs)
    lr: float = 2e-3
    batch_size: int = 512
    recall_weight: float = 4.0      # BCE weight of active targets (pos_weight)
    seed: int = 0


@dataclass
class LayerMetrics:
    recall: float                   # active neurons predicted active / active neurons
    precision: float                # active neurons predicted active / predicted active
    predicted_density: float        # fraction of (token, neuron) pairs predicted active
    exact_density: float            # fraction actually active
    num_tokens: int

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def init_from_gate(gate_weight: torch.Tensor, norm_weight: torch.Tensor,
                   rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fc1 [rank, H], fc2 [I, rank]) computing the rank/2 truncated gate pre-activation."""
    w = gate_weight.float() * norm_weight.float()[None, :]                       # [I, H]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    half = rank // 2
    v = vh[:half]                                                                # [r/2, H]
    us = u[:, :half] * s[:half]                                                  # [I, r/2]
    fc1 = torch.cat([v, -v])                                                     # [r, H]
    fc2 = torch.cat([us, -us], dim=1)                                            # [I, r]
    if rank % 2:   # an odd rank gets one spare (zero) hidden unit
        fc1 = torch.cat([fc1, torch.zeros(1, w.shape[1])])
        fc2 = torch.cat([fc2, torch.zeros(w.shape[0], 1)], dim=1)
    return fc1, fc2


def weighted_bce(logits: torch.Tensor, active: torch.Tensor, recall_weight: float) -> torch.Tensor:
    """Mean binary cross-entropy with active targets weighted recall_weight: -log sigmoid(z)
    = softplus(-z) for an active neuron, softplus(z) for a silent one.
    NOTE: written out because F.binary_cross_entropy_with_logits with pos_weight took ~45% of
    a training step on the CPU."""
    return torch.where(active, recall_weight * F.softplus(-logits), F.softplus(logits)).mean()


def input_scale(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt().clamp(min=1e-6))


def train_layer(samples: LayerSamples, gate_weight: torch.Tensor, norm_weight: torch.Tensor,
                settings: TrainSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 [rank, H] and fc2 [I, rank] (float32) for one layer, reading the raw residual."""
    gen = torch.Generator().manual_seed(settings.seed)
    x, y = samples.inputs, samples.active
    scale = input_scale(x)
    fc1, fc2 = init_from_gate(gate_weight, norm_weight, settings.rank)
    # NOTE: start with decisive logits (std INIT_LOGIT_STD) whatever the gate's scale
    probe = F.relu(x[:1024] / scale @ fc1.t()) @ fc2.t()
    fc2 = fc2 * (INIT_LOGIT_STD / float(probe.std().clamp(min=1e-6)))
    fc1 = fc1.clone().requires_grad_(True)
    fc2 = fc2.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([fc1, fc2], lr=settings.lr)
    n = x.shape[0]
    batch = min(settings.batch_size, n)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    order, cursor = torch.randperm(n, generator=gen), 0
    with torch.enable_grad():
        for _ in range(settings.steps):
            if cursor + batch > n:   # next epoch: reshuffle
                order, cursor = torch.randperm(n, generator=gen), 0
            rows = order[cursor:cursor + batch]
            cursor += batch
            xb = x[rows] / scale                                                 # [B, H]
            logits = F.relu(xb @ fc1.t()) @ fc2.t()                               # [B, I]
            loss = weighted_bce(logits, y[rows], settings.recall_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return (fc1.detach() / scale).contiguous(), fc2.detach().contiguous()


@torch.inference_mode()
def evaluate_layer(fc1: torch.Tensor, fc2: torch.Tensor, samples: LayerSamples,
                   threshold: float = 0.0, chunk: int = 4096) -> LayerMetrics:
    """Recall and precision of `logit > threshold` against the exact activity (held-out tokens)."""
    hits = predicted = actual = 0
    for start in range(0, samples.num_tokens, chunk):
        x = samples.inputs[start:start + chunk]
        truth = samples.active[start:start + chunk]
        guess = (F.relu(x @ fc1.float().t()) @ fc2.float().t()) > threshold       # [T, I]
        hits += int((guess & truth).sum())
        predicted += int(guess.sum())
        actual += int(truth.sum())
    total = samples.active.numel()
    return LayerMetrics(recall=hits / max(actual, 1), precision=hits / max(predicted, 1),
                        predicted_density=predicted / max(total, 1), exact_density=actual / max(total, 1),
                        num_tokens=samples.num_tokens)
