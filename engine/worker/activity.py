"""What one step's FFN activity becomes on the host: the runner's output record, and every
layer's counts queued on the step's single read-back (engine/worker/readback.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparse_serve.engine.worker.readback import StepReadback


@dataclass
class RunnerOutput:
    sampled: dict[int, int]                                 # seq_id -> token id
    logprobs: dict[int, tuple] = field(default_factory=dict)  # seq_id -> (logprob, [(id, logprob)])
    num_active: dict[int, int] = field(default_factory=dict)  # seq_id -> active neurons (all layers)
    # What the step read (engine/core/sparsity.py turns these into params and bytes): FFN weight
    # rows (gate + up + down, all layers) as the kernels reported them, and predictor weights.
    num_rows_read: int = 0
    num_predictor_params_read: int = 0
    computed_fraction: float = 0.0                          # FFN rows read / all FFN rows
    per_layer_active_fraction: list[float] = field(default_factory=list)
    per_layer_computed_fraction: list[float] = field(default_factory=list)  # rows read / 3 * I
    predictor_recall: list[float] | None = None
    predictor_precision: list[float] | None = None


def register_activity(activities, readback: StepReadback) -> list[int]:
    """Queues every layer's counts on the step's read-back (no host sync here)."""
    counts = torch.stack([a.active_counts for a in activities])            # [L, T]
    parts = [counts.sum(dim=0),                                             # [T] active per token
             torch.stack([a.rows_read for a in activities]).sum(dim=1),     # [L] gate + up + down
             counts.to(torch.float64).mean(dim=1)]                          # [L]
    if activities[0].shadow_recall is not None:
        parts += [torch.stack([a.shadow_recall for a in activities]),
                  torch.stack([a.shadow_precision for a in activities])]
    return [readback.add(part) for part in parts]


def apply_activity(host: list[list], handles: list[int], activities, sample_seq_ids: list[int],
                   rows: list[int], intermediate_size: int, result: RunnerOutput) -> None:
    """Fills `result` from the read-back values of register_activity's tensors."""
    per_token, layer_rows, layer_mean = (host[h] for h in handles[:3])
    for seq_id, row in zip(sample_seq_ids, rows):
        result.num_active[seq_id] = int(per_token[row])
    layer_rows = [int(r) for r in layer_rows]
    layer_rows_all = 3 * intermediate_size
    result.num_rows_read = sum(layer_rows)
    result.num_predictor_params_read = sum(a.predictor_params_read for a in activities)
    result.per_layer_active_fraction = [c / intermediate_size for c in layer_mean]
    result.per_layer_computed_fraction = [r / layer_rows_all for r in layer_rows]
    result.computed_fraction = result.num_rows_read / (layer_rows_all * len(activities))
    if len(handles) > 3:
        result.predictor_recall, result.predictor_precision = host[handles[3]], host[handles[4]]
