"""Token statistics for penalties, kept on the device per sequence.

Repetition penalty needs, per row, which tokens the prompt or output contains; presence and
frequency penalties need how often each token was generated. Rebuilding those from the token
histories every step copies every history to the device each step. Instead a sequence's [V]
rows are built once, at its first penalised step, and then updated on the device with each
sampled token (no host round trip). Only sequences that use a penalty get rows.
"""
from __future__ import annotations

import torch

from sparse_serve.engine.core.sampling_params import SamplingParams


def uses_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


class TokenCounts:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self._seen: dict[int, torch.Tensor] = {}      # seq_id -> [V] bool: in prompt or output
        self._counts: dict[int, torch.Tensor] = {}    # seq_id -> [V] float32: output occurrences
        self._num_counted: dict[int, int] = {}        # seq_id -> output tokens already counted

    def rows(self, seqs) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen [S, V] bool, counts [S, V] float32) for the batch's rows; all-zero rows for
        sequences without penalties (their neutral parameters make them no-ops)."""
        zeros_seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        zeros_counts = torch.zeros(self.vocab_size, dtype=torch.float32, device=self.device)
        seen, counts = [], []
        for seq in seqs:
            if uses_penalties(seq.params):
                self._catch_up(seq)
                seen.append(self._seen[seq.seq_id])
                counts.append(self._counts[seq.seq_id])
            else:
                seen.append(zeros_seen)
                counts.append(zeros_counts)
        return torch.stack(seen), torch.stack(counts)

    def _catch_up(self, seq) -> None:
        """First use: from the histories (one copy). Later: nothing, unless tokens were added
        outside `record` (never in the engine; kept exact for safety)."""
        done = self._num_counted.get(seq.seq_id)
        outputs = seq.output_token_ids
        if done is None:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            counts = torch.zeros(self.vocab_size, dtype=torch.float32)
            seen[torch.tensor(seq.prompt_token_ids + outputs, dtype=torch.long)] = True
            counts.index_put_((torch.tensor(outputs, dtype=torch.long),), torch.ones(len(outputs)), accumulate=True)
            self._seen[seq.seq_id] = seen.to(self.device)
            self._counts[seq.seq_id] = counts.to(self.device)
            self._num_counted[seq.seq_id] = len(outputs)
        elif done < len(outputs):
            extra = torch.tensor(outputs[done:], dtype=torch.long, device=self.device)
            self._seen[seq.seq_id][extra] = True
            self._counts[seq.seq_id].index_put_((extra,), torch.ones(len(extra), device=self.device),
                                                accumulate=True)
            self._num_counted[seq.seq_id] = len(outputs)

    def record(self, seqs, token_ids: torch.Tensor) -> None:
        """After sampling: add each penalised row's sampled token (token_ids [S] on the device)."""
        for row, seq in enumerate(seqs):
            if seq.seq_id in self._counts:
                token = token_ids[row:row + 1]
                self._seen[seq.seq_id].index_fill_(0, token, True)
                self._counts[seq.seq_id].index_add_(0, token, torch.ones(1, device=self.device))
                self._num_counted[seq.seq_id] += 1

    def release(self, seq_id: int) -> None:
        for store in (self._seen, self._counts, self._num_counted):
            store.pop(seq_id, None)
