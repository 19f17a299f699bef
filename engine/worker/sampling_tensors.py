"""Per-batch sampling parameters as device tensors, built once per batch composition.

The sampler needs each row's temperature, top-k/top-p/min-p, penalties and logit bias as [S, 1]
tensors. Building them from the requests' parameters is a host-to-device copy per tensor, so the
model runner keeps one `SamplingTensors` for as long as the batch (the ordered sequence ids) stays
the same, which in steady decoding is most steps. A row that does not use a transform gets its
neutral value (temperature 1 for greedy rows, penalty 1, top_k = V, top_p = 1, min_p = 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_serve.engine.core.sampling_params import SamplingParams


@dataclass
class SamplingTensors:
    temperature: torch.Tensor                  # [S, 1] float32
    top_k: list[int]                           # host copy: the top-k path picks a partial topk
    top_p: list[float]
    k: torch.Tensor                            # [S, 1] int64, V where off
    p: torch.Tensor                            # [S, 1] float32, inf where off (see _top_k_top_p)
    min_p: torch.Tensor | None                 # [S, 1], None when no row uses it
    repetition: torch.Tensor | None            # [S, 1], None when no row uses it
    frequency: torch.Tensor | None
    presence: torch.Tensor | None
    bias_index: tuple[torch.Tensor, torch.Tensor] | None   # (rows, token ids) of logit_bias entries
    bias_values: torch.Tensor | None
    greedy_rows: list[int]
    sampled_rows: list[int]
    greedy_index: torch.Tensor | None          # set only for mixed batches
    sampled_index: torch.Tensor | None

    @classmethod
    def build(cls, params: list[SamplingParams], vocab_size: int, device: torch.device) -> "SamplingTensors":
        def column(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).unsqueeze(1).to(device, non_blocking=True)

        def optional(values, neutral) -> torch.Tensor | None:
            return column(values) if any(v != neutral for v in values) else None

        k_list = [k if 0 < k < vocab_size else vocab_size for k in (p.top_k for p in params)]
        top_p = [p.top_p for p in params]
        bias_rows, bias_tokens, bias_values = [], [], []
        for row, p in enumerate(params):
            for token_id, bias in (p.logit_bias or {}).items():
                bias_rows.append(row)
                bias_tokens.append(int(token_id))
                bias_values.append(float(bias))
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        mixed = bool(greedy) and bool(sampled)
        return cls(
            temperature=column([1.0 if p.greedy else p.temperature for p in params]),
            top_k=[p.top_k for p in params], top_p=top_p,
            k=column(k_list, torch.long),
            # NOTE: rows with top_p off get an infinite p: cumsum rounding can push the running
            # mass past 1.0 in the far tail, which must not mask anything for them.
            p=column([pp if pp < 1.0 else float("inf") for pp in top_p]),
            min_p=optional([p.min_p for p in params], 0.0),
            repetition=optional([p.repetition_penalty for p in params], 1.0),
            frequency=optional([p.frequency_penalty for p in params], 0.0),
            presence=optional([p.presence_penalty for p in params], 0.0),
            bias_index=(torch.tensor(bias_rows).to(device), torch.tensor(bias_tokens).to(device))
            if bias_rows else None,
            bias_values=torch.tensor(bias_values, dtype=torch.float32).to(device) if bias_rows else None,
            greedy_rows=greedy, sampled_rows=sampled,
            greedy_index=torch.tensor(greedy).to(device) if mixed else None,
            sampled_index=torch.tensor(sampled).to(device) if mixed else None)

    def rows(self, index: list[int], index_tensor: torch.Tensor) -> "SamplingTensors":
        """The tensors of a subset of rows (the sampled rows of a mixed batch); no bias or penalty
        fields (those are applied to the whole batch before the split)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index_tensor]
        return SamplingTensors(
            temperature=self.temperature[index_tensor], top_k=[self.top_k[i] for i in index],
            top_p=[self.top_p[i] for i in index], k=self.k[index_tensor], p=self.p[index_tensor],
            min_p=pick(self.min_p), repetition=None, frequency=None, presence=None, bias_index=None,
            bias_values=None, greedy_rows=[], sampled_rows=list(range(len(index))), greedy_index=None,
            sampled_index=None)
