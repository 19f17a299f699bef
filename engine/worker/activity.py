"""What one step's FFN activity becomes on the host: the runner's output record and the single
read-back of every layer's counts."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RunnerOutput:
    sampled: dict[int, int]                                 # seq_id -> token id
    logprobs: dict[int, tuple] = field(default_factory=dict)  # seq_id -> (logprob, [(id, logprob)])
    num_active: dict[int, int] = field(default_factory=dict)  # seq_id -> active neurons (all layers)
    computed_fraction: float = 0.0                          # union over the batch / all neurons
    per_layer_active_fraction: list[float] = field(default_factory=list)
    per_layer_computed_fraction: list[float] = field(default_factory=list)
    predictor_recall: list[float] | None = None
    predictor_precision: list[float] | None = None


def read_activity(activities, sample_seq_ids: list[int], rows: list[int], num_tokens: int, intermediate_size: int,
                  result: RunnerOutput) -> None:
    """One host transfer for every layer's counts."""
    counts = torch.stack([a.active_counts for a in activities])            # [L, T]
    unions = torch.stack([a.union_count for a in activities])              # [L]
    per_token_all = counts.sum(dim=0)                                       # [T]
    host = torch.cat([per_token_all.to(torch.float64), unions.to(torch.float64),
                      counts.to(torch.float64).mean(dim=1)]).tolist()
    per_token, union, layer_mean = host[:num_tokens], host[num_tokens:num_tokens + len(unions)], \
        host[num_tokens + len(unions):]
    for seq_id, row in zip(sample_seq_ids, rows):
        result.num_active[seq_id] = int(per_token[row])
    result.per_layer_active_fraction = [c / intermediate_size for c in layer_mean]
    result.per_layer_computed_fraction = [u / intermediate_size for u in union]
    result.computed_fraction = sum(union) / (intermediate_size * len(union))
    if activities[0].shadow_recall is not None:
        recall = torch.stack([a.shadow_recall for a in activities]).tolist()
        precision = torch.stack([a.shadow_precision for a in activities]).tolist()
        result.predictor_recall, result.predictor_precision = recall, precision
