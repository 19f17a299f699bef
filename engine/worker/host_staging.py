"""Host-to-device copies of a step's small input tensors without a synchronisation each.

`torch.tensor(list, device="cuda")` copies from pageable memory, which blocks the host until the
copy is done. Here each named input goes through its own pinned host buffer (grown on demand) and
a `non_blocking=True` copy. NOTE: a buffer is reused by the next step; that is safe because every
step ends with a read-back of its sampled tokens, after which its copies have completed. On a CPU
device there is nothing to copy: the tensor is built directly.
"""
from __future__ import annotations

import torch


class HostStaging:
    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}

    def to_device(self, name: str, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        """values (a flat list of ints) as a 1-D `dtype` tensor on the device."""
        if not self.pinned:
            return torch.tensor(values, dtype=dtype)
        n = len(values)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype:
            size = max(n, 2 * (buffer.numel() if buffer is not None else 64))
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype, pin_memory=True)
        buffer.numpy()[:n] = values
        return buffer[:n].to(self.device, non_blocking=True)
