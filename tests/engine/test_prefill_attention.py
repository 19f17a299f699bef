"""Prefill and mixed steps' attention (AttentionMetadata.prefill_plan, Attention._attend_paged):
the prompts in one padded call and a mixed step's decode rows through the decode kernel, against
one call per sequence: the same outputs for prompts with and without a cached prefix, decode
rows beside them, GQA and sliding windows; and the fallback to one call per sequence where
padding would cost too much."""
from __future__ import annotations

import pytest
import torch

from sparse_serve.engine.models.attention import Attention, AttentionMetadata, PrefillPlan
from sparse_serve.engine.models.layers import RotaryEmbedding

BLOCK = 4


def _step(query_lens: list[int], seq_lens: list[int], num_blocks: int = 64):
    """Metadata of one step: each sequence's blocks, in a shuffled order, and its new tokens'
    slots (the last query_len positions of its context)."""
    gen = torch.Generator().manual_seed(sum(seq_lens))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(-(-k // BLOCK) for k in seq_lens)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    slots = []
    for s, (q, k) in enumerate(zip(query_lens, seq_lens)):
        blocks = [free.pop() for _ in range(-(-k // BLOCK))]
        tables[s, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(k - q, k)]
    return AttentionMetadata(query_lens=query_lens, seq_lens=seq_lens, slot_mapping=torch.tensor(slots),
                             block_tables=tables, seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32),
                             block_size=BLOCK)


def _attention(window: int | None) -> Attention:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, num_kv_heads=2, head_dim=8,
                     rope=RotaryEmbedding(8, 10000.0, 256), sliding_window=window)
    shape = (64, BLOCK, 2, 8)
    attn.kv_cache = (torch.randn(shape), torch.randn(shape))   # earlier tokens' K/V (the prefixes)
    return attn


def _one_call_per_sequence(meta: AttentionMetadata) -> PrefillPlan:
    starts = [0]
    for q in meta.query_lens:
        starts.append(starts[-1] + q)
    return PrefillPlan(starts=starts, sequences=list(range(len(meta.query_lens))))


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("query_lens,seq_lens,padded,decode_rows", [
    ([7, 9, 3], [7, 9, 3], True, 0),                # prompts only
    ([5, 1, 6, 1], [12, 9, 6, 14], True, 2),        # prompts (one after a cached prefix), decode rows beside
    ([8, 8], [8, 10], True, 0),
    ([30, 1, 2, 2], [30, 20, 2, 2], False, 1),      # too uneven to pad: one call per prompt
])
def test_plan_equals_one_call_per_sequence(monkeypatch, window, query_lens, seq_lens, padded, decode_rows):
    attn = _attention(window)
    meta = _step(query_lens, seq_lens)
    plan = meta.prefill_plan(window, split_decode=True)
    assert (plan.q_rows is not None) == padded
    assert (0 if plan.decode_rows is None else len(plan.decode_rows)) == decode_rows
    x = torch.randn(sum(query_lens), 32)
    positions = torch.cat([torch.arange(k - q, k) for q, k in zip(query_lens, seq_lens)])
    caches = [t.clone() for t in attn.kv_cache]
    planned = attn(x, positions, meta)
    attn.kv_cache = tuple(caches)
    reference = _step(query_lens, seq_lens)
    monkeypatch.setattr(reference, "prefill_plan", lambda window, split_decode: _one_call_per_sequence(reference))
    torch.testing.assert_close(planned, attn(x, positions, reference), rtol=1e-5, atol=1e-5)


def test_plan_layout():
    # a 40-token prompt beside three decode rows: the decode rows leave, the prompt stands alone
    plan = _step([40, 1, 1, 1], [40, 30, 20, 10]).prefill_plan(None, split_decode=True)
    assert plan.decode_rows.tolist() == [40, 41, 42] and plan.decode_lens.tolist() == [30, 20, 10]
    assert plan.sequences == [0] and plan.q_rows is None
    # without a decode kernel they stay, and padding them to 40 queries would cost ~4x the work
    plan = _step([40, 1, 1, 1], [40, 30, 20, 10]).prefill_plan(None, split_decode=False)
    assert plan.decode_rows is None and plan.sequences == [0, 1, 2, 3] and plan.q_rows is None
    plan = _step([3, 2], [3, 4]).prefill_plan(None, split_decode=True)
    assert plan.q_rows.tolist() == [[0, 1, 2], [3, 4, 4]]              # padding repeats the last row
    assert plan.padded_rows.tolist() == [0, 1, 2, 3, 4] and plan.padded_valid.tolist() == [0, 1, 2, 3, 4]
    assert plan.mask.shape == (2, 1, 3, 4) and plan.mask.any(-1).all()   # no fully masked row
    assert plan.mask[1, 0, 0].tolist() == [True, True, True, False]    # causal past a 2-token prefix
