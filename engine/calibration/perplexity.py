"""Perplexity and measured FFN sparsity of the native model on fixed token windows.

Sparsity is read from the model's own per-token activity counts and turned into a fraction by
SparsityAccounting (engine/core/sparsity.py), the one definition the server also reports;
nothing here recounts neurons.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_serve.engine.core.sparsity import SparsityAccounting
from sparse_serve.engine.models.attention import AttentionMetadata


@dataclass
class EvalResult:
    perplexity: float
    mean_nll: float
    num_tokens: int                 # predicted tokens (window length - 1 per window)
    sparsity: float                 # mean over processed tokens, from the activity counts
    layer_sparsity: list[float]     # the same per layer


def accounting_for(model) -> SparsityAccounting:
    cfg = model.config
    return SparsityAccounting(total_params=model.num_params(), hidden_size=cfg.hidden_size,
                              intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers)


def batches(windows: Sequence[torch.Tensor], tokens_per_batch: int) -> list[list[torch.Tensor]]:
    """Group windows into batches of about tokens_per_batch tokens (at least one window each)."""
    groups: list[list[torch.Tensor]] = [[]]
    for window in windows:
        if groups[-1] and sum(len(w) for w in groups[-1]) + len(window) > tokens_per_batch:
            groups.append([])
        groups[-1].append(window)
    return [g for g in groups if g]


def forward_windows(model, windows: Sequence[torch.Tensor]):
    """One cache-free forward over several windows: (hidden [T, H], activities, positions [T])."""
    device = model.lm_head.weight.device
    ids = torch.cat(list(windows)).to(device)                                       # [T]
    positions = torch.cat([torch.arange(len(w)) for w in windows]).to(device)       # [T]
    meta = AttentionMetadata.for_full_sequences([len(w) for w in windows])
    hidden, activities = model(ids, positions, meta)
    return hidden, activities, ids


def next_token_targets(windows: Sequence[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N] of the flat batch that predict a token, their target ids [N])."""
    rows, targets, start = [], [], 0
    for w in windows:
        rows.append(torch.arange(start, start + len(w) - 1))
        targets.append(w[1:])
        start += len(w)
    return torch.cat(rows).to(device), torch.cat(targets).to(device)


@torch.inference_mode()
def evaluate(model, windows: Sequence[torch.Tensor], tokens_per_batch: int = 2048) -> EvalResult:
    """Mean next-token NLL over all windows, and the FFN sparsity the model itself counted."""
    accounting = accounting_for(model)
    num_layers, inter = model.config.num_layers, model.config.intermediate_size
    nll_sum, num_predicted, num_processed = 0.0, 0, 0
    active_total = 0
    active_per_layer = torch.zeros(num_layers, dtype=torch.float64)
    for group in batches(windows, tokens_per_batch):
        hidden, activities, _ = forward_windows(model, group)
        rows, targets = next_token_targets(group, hidden.device)
        logits = model.compute_logits(hidden[rows])                                  # [N, V]
        nll_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        num_predicted += len(rows)
        counts = torch.stack([a.active_counts for a in activities]).to(torch.int64)  # [L, T]
        active_total += int(counts.sum())
        active_per_layer += counts.sum(dim=1).cpu().double()
        num_processed += counts.shape[1]
    mean_nll = nll_sum / max(num_predicted, 1)
    # Mean sparsity over tokens == sparsity of the mean active count (the definition is linear).
    sparsity = accounting.sparsity(active_total / max(num_processed, 1))
    layer_sparsity = (1.0 - active_per_layer / (max(num_processed, 1) * inter)).tolist()
    return EvalResult(perplexity=math.exp(mean_nll), mean_nll=mean_nll, num_tokens=num_predicted,
                      sparsity=sparsity, layer_sparsity=layer_sparsity)
