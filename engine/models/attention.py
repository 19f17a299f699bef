"""Grouped-query self-attention over a paged KV cache (torch path).

The model runner builds one `AttentionMetadata` per step and the layers read only that: they
never see request objects. With no cache attached (`kv_cache is None`) each sequence attends to
its own new tokens only: that is how parity tests and perplexity evaluation run full sequences.
Batches of single-token decodes go through the paged-decode kernels: Triton on CUDA, the native
kernel on the CPU (both read K/V in place through the block table).

Per-step work that does not depend on the layer (rotary cos/sin for the step's positions, the
decode gather index and padding mask) is built by the first layer that needs it and cached on
the metadata object, so the other layers reuse it: on a small model the per-layer tensor
bookkeeping, not the arithmetic, is what a decode step on the CPU spends its time on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparse_serve.engine.models.layers import RotaryEmbedding
from sparse_serve.kernels import dispatch, linear_int8_cpu, paged_attention_cpu
from sparse_serve.kernels.paged_attention import paged_attention_decode


@dataclass
class AttentionMetadata:
    query_lens: list[int]            # new tokens per sequence this step
    seq_lens: list[int]              # tokens in context per sequence after this step
    slot_mapping: torch.Tensor | None = None   # [T] int64: flat cache slot for each new token
    block_tables: torch.Tensor | None = None   # [S, max_blocks] int32 (padded with 0)
    seq_lens_tensor: torch.Tensor | None = None  # [S] int32, on the model's device
    block_size: int = 16
    # [T, 1] in the model's dtype: 1 for a real row, 0 for a CUDA-graph padding row (the model
    # zeroes those rows' embeddings; engine/worker/decode_graphs.py); None: every row is real.
    real_rows: torch.Tensor | None = None
    # Per-step caches shared by all layers (filled lazily, see the module docstring).
    _rope: tuple | None = field(default=None, repr=False)
    _decode_cache: dict = field(default_factory=dict, repr=False)
    _prefill_cache: dict = field(default_factory=dict, repr=False)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @classmethod
    def for_full_sequences(cls, lengths: list[int]) -> "AttentionMetadata":
        """No cache: each sequence's tokens attend causally to each other only."""
        return cls(query_lens=list(lengths), seq_lens=list(lengths))

    def rope_tables(self, rope: RotaryEmbedding,
                    positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos [T, 1, D], signed sin [T, 1, D]) float32 for this step's positions, built once.

        The sign of rotate-half is folded into sin (first half negated), so a rotation is
        x * cos + swap_halves(x) * sin, with the same products as the reference formula."""
        if self._rope is None or self._rope[0] is not positions:
            # NOTE: gathered once per step here, not per layer: saves two gathers and the
            # per-layer sign flips.
            cos_table, sin_table = rope.table(positions.device)
            cos = cos_table[positions].unsqueeze(1)                              # [T, 1, D]
            sin = sin_table[positions].unsqueeze(1)
            half = sin.shape[-1] // 2
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            self._rope = (positions, cos, sin)
        return self._rope[1], self._rope[2]

    def decode_context(self, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode-only steps: (slots [S, K] int64, mask [S, 1, 1, K] bool or None), built once.

        slots[s, p] is the flat cache slot of sequence s's context position p (K = the longest
        context; shorter sequences are padded with their own first slot and masked). The mask
        is None when nothing needs masking (equal lengths, no window in reach)."""
        cached = self._decode_cache.get(sliding_window)
        if cached is not None:
            return cached
        max_len = max(self.seq_lens)
        slots = self._context_slots(self.block_tables, max_len)                  # [S, K]
        windowed = sliding_window is not None and max_len > sliding_window
        mask = None
        if windowed or min(self.seq_lens) != max_len:
            k_pos = torch.arange(max_len, device=slots.device).unsqueeze(0)      # [1, K]
            lens = self.seq_lens_tensor.long().unsqueeze(1)                      # [S, 1]
            mask = k_pos < lens
            if windowed:
                mask &= k_pos >= lens - sliding_window
            mask = mask[:, None, None, :]                                        # [S, 1, 1, K]
        self._decode_cache[sliding_window] = (slots, mask)
        return slots, mask


    def _context_slots(self, tables: torch.Tensor, max_len: int) -> torch.Tensor:
        """slots [S, max_len] int64: the flat cache slot of each sequence's context position p,
        from block tables [S, >= ceil(max_len / block_size)] (past a sequence's own blocks, the
        table's padding: callers mask those positions)."""
        bs = self.block_size
        blocks = tables[:, :-(-max_len // bs)].long()                             # [S, NB]
        offsets = torch.arange(bs, device=tables.device)
        return (blocks.unsqueeze(2) * bs + offsets).flatten(1)[:, :max_len].contiguous()

    def prefill_plan(self, sliding_window: int | None, split_decode: bool) -> PrefillPlan:
        """How a step with a prefill attends, built once per step (Attention._attend_paged).

        split_decode: the sequences with one new token (decode rows beside the prompts of a
        mixed step) go to the decode kernel, as in a decode-only step. The others take one SDPA
        call, every sequence's query rows and context padded to the longest, unless padding
        would more than double the attention's work (a long prompt beside short ones): then one
        call per sequence.
        NOTE: one SDPA call per sequence and layer took 12% of a 16-prompt SmolLM2 prefill on
        the CPU (~47-token prompts: the calls' overhead, not their work); in a mixed step the
        decode rows would pad every sequence to the prompts' length."""
        key = (sliding_window, split_decode)
        if key in self._prefill_cache:
            return self._prefill_cache[key]
        device = self.block_tables.device
        starts = [0]
        for q in self.query_lens:
            starts.append(starts[-1] + q)
        decode = [s for s, q in enumerate(self.query_lens) if q == 1] if split_decode else []
        if len(decode) == len(self.query_lens):   # nothing to prefill (not a prefill step after all)
            decode = []
        plan = PrefillPlan(starts=starts, sequences=[s for s in range(len(self.query_lens)) if s not in set(decode)])
        if decode:
            index = torch.tensor(decode, device=device)
            plan.decode_rows = torch.tensor([starts[s] for s in decode], device=device)
            plan.decode_tables = self.block_tables.index_select(0, index).contiguous()
            plan.decode_lens = self.seq_lens_tensor.index_select(0, index).contiguous()
        seqs = plan.sequences
        q_lens_list = [self.query_lens[s] for s in seqs]
        k_lens_list = [self.seq_lens[s] for s in seqs]
        q_max, k_max = max(q_lens_list), max(k_lens_list)
        work = sum(q * k for q, k in zip(q_lens_list, k_lens_list))
        if len(seqs) > 1 and len(seqs) * q_max * k_max <= 2 * work:
            index = torch.tensor(seqs, device=device)
            q_lens = torch.tensor(q_lens_list, device=device).unsqueeze(1)         # [S, 1]
            k_lens = torch.tensor(k_lens_list, device=device).unsqueeze(1)         # [S, 1]
            j = torch.arange(q_max, device=device).unsqueeze(0)                     # [1, Q]
            last = torch.minimum(j, q_lens - 1)                                     # [S, Q]
            first_rows = torch.tensor([starts[s] for s in seqs], device=device).unsqueeze(1)
            q_pos = (k_lens - q_lens) + last                                        # [S, Q] in context
            k_pos = torch.arange(k_max, device=device).view(1, 1, k_max)           # [1, 1, K]
            mask = k_pos <= q_pos.unsqueeze(2)                                      # [S, Q, K]
            if sliding_window is not None:
                mask &= k_pos > q_pos.unsqueeze(2) - sliding_window
            valid = j < q_lens                                                      # [S, Q]
            plan.q_rows = first_rows + last                                         # [S, Q]
            plan.slots = self._context_slots(self.block_tables.index_select(0, index), k_max)   # [S, K]
            plan.mask = mask.unsqueeze(1)                                           # [S, 1, Q, K]
            plan.padded_valid = (torch.arange(len(seqs), device=device).unsqueeze(1) * q_max + j)[valid]
            plan.padded_rows = (first_rows + j)[valid]                              # [T'] packed rows
        self._prefill_cache[key] = plan
        return plan


@dataclass
class PrefillPlan:
    """AttentionMetadata.prefill_plan's answer. decode_rows [Sd]: the packed query row of each
    sequence that goes to the decode kernel, with its block table and context length; sequences:
    the others, which take one padded SDPA call where q_rows is set (q_rows [S, Q]: the packed
    row each padded row reads, padding repeating a sequence's last row so no row is fully
    masked; slots [S, K] each context position's cache slot; mask [S, 1, Q, K] causal, in the
    context, in the window; padded_valid [T'] the real rows of the flattened [S * Q] output, and
    padded_rows [T'] their packed rows), else one call per sequence. starts [S + 1]: each
    sequence's first packed row."""
    starts: list[int]
    sequences: list[int]
    decode_rows: torch.Tensor | None = None
    decode_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    q_rows: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    padded_valid: torch.Tensor | None = None
    padded_rows: torch.Tensor | None = None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, H, D] in float32, returned in x's dtype."""
    half = x.shape[-1] // 2
    x32 = x.float()
    swapped = torch.cat((x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + swapped * sin_signed).to(x.dtype)


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
        # [Hq*D + 2*Hkv*D, H], filled by fuse_qkv(); not persistent, so checkpoints keep HF names.
        self.register_buffer("w_qkv", None, persistent=False)
        # [Hq*D + 2*Hkv*D] float32 per-row scales when w_qkv holds int8 (engine/models/quantized.py).
        self.register_buffer("w_qkv_scale", None, persistent=False)
        self.w_qkv_x_bits = 16   # the activation grid of the int8 w_qkv (kernels/activation_grid.py)
        # Set by the model runner: (k_cache, v_cache), each [num_blocks, block_size, Hkv, D].
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """One [q; k; v] weight so a step runs one projection GEMM instead of three.

        q/k/v_proj.weight become views of the fused weight: no extra memory, the HF parameter
        names and counts stay, and an in-place load into them updates the fused weight too.
        NOTE: a later `.to()` would copy the views apart; the runner fuses after loading and
        never moves the model again."""
        if self.w_qkv is not None:
            return
        projs = (self.q_proj, self.k_proj, self.v_proj)
        fused = torch.cat([p.weight for p in projs], dim=0)                     # [Nq+2Nkv, H]
        start = 0
        for p in projs:
            rows = p.weight.shape[0]
            p.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
            start += rows
        self.w_qkv = fused

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = meta.rope_tables(self.rope, positions)
        if self.w_qkv is not None:
            qkv = self._project_qkv(x)                                           # [T, (Hq+2Hkv)*D]
            # q and k are rotated together: one set of elementwise ops for both.
            qk = rotate(qkv[:, :(hq + hkv) * d].view(num_tokens, hq + hkv, d), cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]                                        # [T, Hq, D], [T, Hkv, D]
            v = qkv[:, (hq + hkv) * d:].view(num_tokens, hkv, d)                 # [T, Hkv, D]
        else:
            q = rotate(self.q_proj(x).view(num_tokens, hq, d), cos, sin)         # [T, Hq, D]
            k = rotate(self.k_proj(x).view(num_tokens, hkv, d), cos, sin)        # [T, Hkv, D]
            v = self.v_proj(x).view(num_tokens, hkv, d)
        if self.kv_cache is None:
            out = self._attend_uncached(q, k, v, meta)
        else:
            k_cache, v_cache = self.kv_cache
            # Write first, then read: a sequence's new tokens see each other through the cache.
            k_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, k)
            v_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, v)
            if meta.is_decode_only:
                out = self._decode(q, k_cache, v_cache, meta)
            else:
                out = self._attend_paged(q, k_cache, v_cache, meta)
        return self.o_proj(out.reshape(num_tokens, hq * d))

    def _project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] through the fused weight: int8 weight-only when quantized, else F.linear."""
        if self.w_qkv_scale is not None:
            return linear_int8_cpu.linear_int8(x, self.w_qkv, self.w_qkv_scale, self.w_qkv_x_bits)
        return F.linear(x, self.w_qkv)

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
        """Prefill chunks and mixed batches (AttentionMetadata.prefill_plan): the decode rows
        through the decode kernel where one runs, the prompts in one padded SDPA call, or one
        call per sequence where padding would cost more than it saves."""
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        # NOTE: the decode rows split off on the CPU only, where the native decode kernel is
        # tested on such subsets; a GPU mixed step keeps them in the SDPA calls as before.
        split = not dispatch.runs_triton(q) and paged_attention_cpu.native_supported(q, k_cache, v_cache)
        plan = meta.prefill_plan(self.sliding_window, split)
        out = torch.empty_like(q)                                                         # [T, Hq, D]
        if plan.decode_rows is not None:
            out[plan.decode_rows] = paged_attention_decode(
                q[plan.decode_rows], k_cache, v_cache, plan.decode_tables, plan.decode_lens, self.scale,
                self.sliding_window)
        if plan.q_rows is not None:
            num_seqs, q_max = plan.q_rows.shape
            qs = q[plan.q_rows.view(-1)].view(num_seqs, q_max, hq, d).transpose(1, 2)      # [S, Hq, Q, D]
            flat = plan.slots.view(-1)
            ks = k_cache.view(-1, hkv, d).index_select(0, flat).view(num_seqs, -1, hkv, d).transpose(1, 2)
            vs = v_cache.view(-1, hkv, d).index_select(0, flat).view(num_seqs, -1, hkv, d).transpose(1, 2)
            o = self._sdpa(qs, ks, vs, plan.mask)                                          # [S, Hq, Q, D]
            out[plan.padded_rows] = o.transpose(1, 2).reshape(num_seqs * q_max, hq, d)[plan.padded_valid]
            return out
        for i in plan.sequences:
            query_len, seq_len, start = meta.query_lens[i], meta.seq_lens[i], plan.starts[i]
            num_blocks = -(-seq_len // meta.block_size)
            block_ids = meta.block_tables[i, :num_blocks].long()
            ks = self._gather(k_cache, block_ids, seq_len).transpose(0, 1).unsqueeze(0)  # [1, Hkv, K, D]
            vs = self._gather(v_cache, block_ids, seq_len).transpose(0, 1).unsqueeze(0)
            qs = q[start:start + query_len].transpose(0, 1).unsqueeze(0)                 # [1, Hq, Q, D]
            o = self._sdpa(qs, ks, vs, self._mask(query_len, seq_len, q.device))
            out[start:start + query_len] = o[0].transpose(0, 1)
        return out

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence: gather every sequence's context at once, one SDPA call."""
        # NOTE: CUDA -> Triton; CPU -> the native kernel reading K/V in place where it built
        # (float32/bfloat16); the gather below is the fallback.
        if dispatch.runs_triton(q) or paged_attention_cpu.native_supported(q, k_cache, v_cache):
            return paged_attention_decode(q, k_cache, v_cache, meta.block_tables,
                                          meta.seq_lens_tensor, self.scale, self.sliding_window)
        slots, mask = meta.decode_context(self.sliding_window)                  # [S, K]
        num_seqs, max_len = slots.shape
        hkv, d = self.num_kv_heads, self.head_dim
        flat = slots.view(-1)
        ks = k_cache.view(-1, hkv, d).index_select(0, flat).view(num_seqs, max_len, hkv, d)
        vs = v_cache.view(-1, hkv, d).index_select(0, flat).view(num_seqs, max_len, hkv, d)
        # NOTE: GQA without repeating K/V: the G query heads that share a KV head become G
        # "query positions" of that head (one decode query has no causal structure among them).
        group = self.num_heads // hkv
        qg = q.reshape(num_seqs, hkv, group, d)                                  # [S, Hkv, G, D]
        o = F.scaled_dot_product_attention(qg, ks.transpose(1, 2), vs.transpose(1, 2),
                                           attn_mask=mask, scale=self.scale)     # [S, Hkv, G, D]
        return o.reshape(num_seqs, self.num_heads, d)
