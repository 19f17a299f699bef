"""Grouped-query self-attention over a paged KV cache (torch path).

The model runner builds one `AttentionMetadata` per step and the layers read only that: they
never see request objects. With no cache attached (`kv_cache is None`) each sequence attends to
its own new tokens only: that is how parity tests and perplexity evaluation run full sequences.
On CUDA, batches of single-token decodes go through the Triton paged-decode kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import RotaryEmbedding


@dataclass
class AttentionMetadata:
    query_lens: list[int]            # new tokens per sequence this step
    seq_lens: list[int]              # tokens in context per sequence after this step
    slot_mapping: torch.Tensor | None = None   # [T] int64: flat cache slot for each new token
    block_tables: torch.Tensor | None = None   # [S, max_blocks] int32 (padded with 0)
    seq_lens_tensor: torch.Tensor | None = None  # [S] int32, on the model's device
    block_size: int = 16

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @classmethod
    def for_full_sequences(cls, lengths: list[int]) -> "AttentionMetadata":
        """No cache: each sequence's tokens attend causally to each other only."""
        return cls(query_lens=list(lengths), seq_lens=list(lengths))


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.rope = rope
        self.sliding_window = sliding_window
        self.scale = head_dim ** -0.5
        # Set by the model runner: (k_cache, v_cache), each [num_blocks, block_size, Hkv, D].
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)      # [T, Hq, D]
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)   # [T, Hkv, D]
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rope(q, k, positions)
        if self.kv_cache is None:
            out = self._attend_uncached(q, k, v, meta)
        else:
            k_cache, v_cache = self.kv_cache
            # Write first, then read: a sequence's new tokens see each other through the cache.
            k_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = k
            v_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = v
            if meta.is_decode_only:
                out = self._decode(q, k_cache, v_cache, meta)
            else:
                out = self._attend_paged(q, k_cache, v_cache, meta)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q: [B, Hq, Q, D], k/v: [B, Hkv, K, D], mask: bool broadcastable to [B, Hq, Q, K]."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                              enable_gqa=self.num_heads != self.num_kv_heads)

    def _mask(self, query_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
        q_pos = torch.arange(seq_len - query_len, seq_len, device=device).unsqueeze(1)  # [Q, 1]
        k_pos = torch.arange(seq_len, device=device).unsqueeze(0)                        # [1, K]
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask &= k_pos > q_pos - self.sliding_window
        return mask                                                                      # [Q, K]

    def _attend_uncached(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        outs, start = [], 0
        for length in meta.query_lens:
            end = start + length
            qs = q[start:end].transpose(0, 1).unsqueeze(0)                  # [1, Hq, L, D]
            ks = k[start:end].transpose(0, 1).unsqueeze(0)                  # [1, Hkv, L, D]
            vs = v[start:end].transpose(0, 1).unsqueeze(0)
            o = self._sdpa(qs, ks, vs, self._mask(length, length, q.device))
            outs.append(o[0].transpose(0, 1))                               # [L, Hq, D]
            start = end
        return torch.cat(outs, dim=0)

    def _gather(self, cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
        return cache[block_ids].reshape(-1, self.num_kv_heads, self.head_dim)[:seq_len]  # [K, Hkv, D]

    def _attend_paged(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Prefill chunks and mixed batches: one SDPA call per sequence."""
        outs, start = [], 0
        for i, (query_len, seq_len) in enumerate(zip(meta.query_lens, meta.seq_lens)):
            end = start + query_len
            num_blocks = -(-seq_len // meta.block_size)
            block_ids = meta.block_tables[i, :num_blocks].long()
            ks = self._gather(k_cache, block_ids, seq_len).transpose(0, 1).unsqueeze(0)  # [1, Hkv, K, D]
            vs = self._gather(v_cache, block_ids, seq_len).transpose(0, 1).unsqueeze(0)
            qs = q[start:end].transpose(0, 1).unsqueeze(0)                               # [1, Hq, Q, D]
            o = self._sdpa(qs, ks, vs, self._mask(query_len, seq_len, q.device))
            outs.append(o[0].transpose(0, 1))
            start = end
        return torch.cat(outs, dim=0)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence: gather every sequence's blocks at once, one masked SDPA."""
        if q.is_cuda:
            from kernels.paged_attention import paged_attention_decode
            return paged_attention_decode(q, k_cache, v_cache, meta.block_tables,
                                          meta.seq_lens_tensor, self.scale, self.sliding_window)
        max_len = max(meta.seq_lens)
        num_blocks = -(-max_len // meta.block_size)
        block_ids = meta.block_tables[:, :num_blocks].long()                             # [S, NB]
        num_seqs = block_ids.shape[0]
        ks = k_cache[block_ids].reshape(num_seqs, -1, self.num_kv_heads, self.head_dim)  # [S, K, Hkv, D]
        vs = v_cache[block_ids].reshape(num_seqs, -1, self.num_kv_heads, self.head_dim)
        k_pos = torch.arange(ks.shape[1], device=q.device).unsqueeze(0)                 # [1, K]
        lens = meta.seq_lens_tensor.unsqueeze(1)                                         # [S, 1]
        mask = k_pos < lens
        if self.sliding_window is not None:
            mask &= k_pos > lens - 1 - self.sliding_window
        o = self._sdpa(q.unsqueeze(2), ks.transpose(1, 2), vs.transpose(1, 2),
                       mask[:, None, None, :])                                           # [S, Hq, 1, D]
        return o.squeeze(2)
