"""Small building blocks shared by the decoder: RMSNorm and rotary position embeddings."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: normalise in float32 and cast back before the weight, as the HF reference does,
        # so bf16/fp16 results match transformers bit for bit where possible.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding:
    """RoPE tables in the rotate-half layout that HF Llama/Mistral checkpoints use: default, or
    linear scaling (positions divided by `scaling_factor`, as transformers' "linear" rope_type).

    The layers never rotate through this class: AttentionMetadata.rope_tables gathers the step's
    rows once and every layer reuses them."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, scaling_factor: float = 1.0):
        # NOTE: no buffers: the tables are built lazily in float32 on the first call, so meta-device
        # construction and .to(bf16) never touch them.
        self.head_dim, self.theta, self.scaling_factor = head_dim, theta, scaling_factor
        self.max_positions = max_positions
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos [P, D], sin [P, D]) float32 for every position up to max_positions."""
        if self._cos is None or self._cos.device != device:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
            inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))   # [D/2]
            positions = torch.arange(self.max_positions, device=device, dtype=torch.float32)
            freqs = torch.outer(positions / self.scaling_factor, inv_freq)  # [P, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)                        # [P, D]
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos, self._sin
