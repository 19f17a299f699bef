"""Batched torch paged-attention decode: the reference, and the CPU path.

K/V are gathered through the block table into [S, L, Hkv, D] (L = max_blocks * block_size);
positions at or beyond a sequence's context length, or outside its sliding window, are masked.
"""

from __future__ import annotations

import torch
from torch import Tensor


def paged_attention_decode_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                               block_tables: Tensor, context_lens: Tensor, scale: float,
                               sliding_window: int | None = None) -> Tensor:
    """q [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables
    [S, max_blocks] int32 (entries past a sequence's blocks may hold anything in range or -1);
    context_lens [S] int32 (tokens in cache including the current one, >= 1).
    A query attends to key positions p with ctx - sliding_window <= p < ctx. Returns [S, Hq, D]
    in q.dtype (softmax in float32)."""
    S, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    assert Hq % Hkv == 0, f"Hq={Hq} must be a multiple of Hkv={Hkv}"
    tables = block_tables.long().clamp(min=0)                            # [S, B]
    L = tables.shape[1] * block_size
    k = k_cache[tables].reshape(S, L, Hkv, D).float()                    # [S, L, Hkv, D]
    v = v_cache[tables].reshape(S, L, Hkv, D).float()                    # [S, L, Hkv, D]
    group = Hq // Hkv
    qf = q.float().reshape(S, Hkv, group, D)                             # [S, Hkv, G, D]
    scores = torch.einsum("skgd,slkd->skgl", qf, k) * scale             # [S, Hkv, G, L]
    pos = torch.arange(L, device=q.device)                               # [L]
    ctx = context_lens.long().unsqueeze(1)                               # [S, 1]
    valid = pos.unsqueeze(0) < ctx                                       # [S, L]
    if sliding_window is not None:
        valid &= pos.unsqueeze(0) >= ctx - sliding_window
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)                                # [S, Hkv, G, L]
    out = torch.einsum("skgl,slkd->skgd", probs, v)                      # [S, Hkv, G, D]
    return out.reshape(S, Hq, D).to(q.dtype)
