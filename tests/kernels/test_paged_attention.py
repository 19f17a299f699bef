"""Paged-attention decode: Triton kernel vs the batched torch reference, and the reference vs
a naive per-sequence loop over the logical token order."""

import pytest
import torch

from kernels.paged_attention import paged_attention_decode
from kernels.paged_attention_ref import paged_attention_decode_ref
from tests.kernels.kernel_cases import DTYPES, assert_close, poison_allocations, triton_device

# (S, Hq, Hkv, D, block_size, context_lens)
CASES = [
    (1, 4, 4, 64, 16, [1]),                       # MHA, a single token
    (3, 8, 2, 40, 16, [17, 32, 70]),              # GQA x4, D off a power of two, exact multiple
    (2, 6, 1, 32, 5, [9, 23]),                    # MQA, odd block size
]
WINDOWS = [None, 7, 1000]


def _make(case, dtype, device, seed):
    S, Hq, Hkv, D, block_size, lens = case
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lens) + 1
    num_blocks = S * max_blocks + 3
    q = torch.randn(S, Hq, D, generator=gen)
    k = torch.randn(num_blocks, block_size, Hkv, D, generator=gen)
    v = torch.randn(num_blocks, block_size, Hkv, D, generator=gen)
    # Scattered physical blocks; unused table entries hold -1 (they must never be read).
    tables = torch.full((S, max_blocks), -1, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen)
    for s, n in enumerate(lens):
        used = -(-n // block_size)
        tables[s, :used] = perm[s * max_blocks:s * max_blocks + used].int()
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return [t.to(dtype).to(device) for t in (q, k, v)] + [tables.to(device), lens_t.to(device)]


def _naive(q, k, v, tables, lens, scale, window):
    S, Hq, D = q.shape
    block_size, Hkv = k.shape[1], k.shape[2]
    out = torch.empty(S, Hq, D)
    for s in range(S):
        n = int(lens[s])
        pos = range(max(0, n - window) if window else 0, n)
        ks = torch.stack([k[tables[s, p // block_size], p % block_size] for p in pos]).float()
        vs = torch.stack([v[tables[s, p // block_size], p % block_size] for p in pos]).float()
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            w = torch.softmax(ks[:, kv] @ q[s, h].float() * scale, dim=0)
            out[s, h] = w @ vs[:, kv]
    return out


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_naive_loop(case, window):
    q, k, v, tables, lens = _make(case, torch.float32, "cpu", seed=11)
    scale = q.shape[-1] ** -0.5
    out = paged_attention_decode(q, k, v, tables, lens, scale, window)  # CPU dispatch
    assert_close(out, _naive(q, k, v, tables, lens, scale, window), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(monkeypatch, case, window, dtype):
    pytest.importorskip("triton")
    from kernels import paged_attention_triton

    q, k, v, tables, lens = _make(case, dtype, triton_device(), seed=5)
    scale = q.shape[-1] ** -0.5
    poison_allocations(monkeypatch, paged_attention_triton)
    out = paged_attention_triton.paged_attention_decode_triton(q, k, v, tables, lens, scale,
                                                               window)
    assert_close(out, paged_attention_decode_ref(q, k, v, tables, lens, scale, window), dtype)


def test_triton_rejects_int64_tables():
    pytest.importorskip("triton")
    from kernels import paged_attention_triton

    q, k, v, tables, lens = _make(CASES[0], torch.float32, triton_device(), seed=1)
    with pytest.raises(AssertionError):
        paged_attention_triton.paged_attention_decode_triton(q, k, v, tables.long(), lens, 1.0)
