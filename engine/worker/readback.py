"""Everything one step needs on the host, in one device-to-host transfer.

Each `.tolist()` of a CUDA tensor is a synchronisation; a step used to pay one for its sampled
ids, one per logprob tensor and one for the FFN counts. Here each part is registered, flattened
to float64 (exact for token ids, counts and float32 values) and fetched with one concatenation
and one copy. On a CPU the same code runs; the copy is then free.
"""
from __future__ import annotations

import torch


class StepReadback:
    def __init__(self):
        self._parts: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> int:
        """Registers a 1-D or 2-D tensor; returns its handle for `fetch`'s result."""
        assert tensor.dim() in (1, 2), tensor.shape
        self._parts.append(tensor)
        return len(self._parts) - 1

    def fetch(self) -> list[list]:
        """The registered tensors as nested Python lists (floats), in registration order."""
        if not self._parts:
            return []
        flat = torch.cat([part.reshape(-1).to(torch.float64) for part in self._parts]).tolist()
        out, start = [], 0
        for part in self._parts:
            n = part.numel()
            values = flat[start:start + n]
            start += n
            if part.dim() == 2:
                rows, width = part.shape
                values = [values[i * width:(i + 1) * width] for i in range(rows)]
            out.append(values)
        return out
