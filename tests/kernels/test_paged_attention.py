"""Paged-attention decode: Triton kernel vs the batched torch reference, and the reference vs
a naive per-sequence loop over the logical token order."""

import pytest
import torch

from sparse_serve.kernels.paged_attention import paged_attention_decode
from sparse_serve.kernels.paged_attention_ref import paged_attention_decode_ref
from tests.kernels.kernel_cases import DTYPES, assert_close, poison_allocations, triton_device

# (S, Hq, Hkv, D, block_size, context_lens)
CASES = [
    (1, 4, 4, 64, 16, [1]),                       # MHA, a single token
    (3, 8, 2, 40, 16, [17, 32, 70]),              # GQA x4, D off a power of two, exact multiple
    (2, 6, 1, 32, 5, [9, 23]),                    # MQA, odd block size
    (4, 4, 2, 32, 8, [45, 1, 100, 64]),           # mixed lengths, one token, 1-7 partitions
]
# 7 and 20 start the window inside a partition of 16 or 32 positions, after whole partitions.
WINDOWS = [None, 7, 20, 1000]


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


def _triton(monkeypatch, q, k, v, tables, lens, window, **kw):
    """The Triton launcher on poisoned allocations (output and partials start as NaN)."""
    pytest.importorskip("triton")
    from sparse_serve.kernels import paged_attention_triton

    poison_allocations(monkeypatch, paged_attention_triton)
    return paged_attention_triton.paged_attention_decode_triton(
        q, k, v, tables, lens, q.shape[-1] ** -0.5, window, **kw)


def _ref(q, k, v, tables, lens, window):
    return paged_attention_decode_ref(q, k, v, tables, lens, q.shape[-1] ** -0.5, window)


# (partition, block_n) besides the 16 x 16 of test_triton_matches_reference: two steps per
# partition, and the default (one partition for these short tables: the single-kernel path).
TILES = [(32, 16), (128, 32)]


# NOTE: the interpreter runs a program in ~10 ms: the float32 runs sweep every window, the
# 16-bit ones and the other tiles two of them, which keeps this file under a minute.
@pytest.mark.parametrize("window, dtype", [(w, torch.float32) for w in WINDOWS]
                         + [(w, d) for w in (None, 20) for d in DTYPES if d != torch.float32],
                         ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(monkeypatch, case, window, dtype):
    q, k, v, tables, lens = _make(case, dtype, triton_device(), seed=5)
    out = _triton(monkeypatch, q, k, v, tables, lens, window, partition=16, block_n=16)
    assert_close(out, _ref(q, k, v, tables, lens, window), dtype)


@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_tiles(monkeypatch, case, window, tile):
    q, k, v, tables, lens = _make(case, torch.float32, triton_device(), seed=6)
    partition, block_n = tile
    out = _triton(monkeypatch, q, k, v, tables, lens, window, partition=partition,
                  block_n=block_n)
    assert_close(out, _ref(q, k, v, tables, lens, window), torch.float32)


@pytest.mark.parametrize("bound", ["exact", "loose", "one partition"])
def test_triton_max_context_len(monkeypatch, bound):
    """A host bound sets the number of partitions: the longest context, a looser one (empty
    partitions past every context), or one that fits one partition (the single-kernel path)."""
    case = CASES[-1] if bound != "one partition" else CASES[1]
    q, k, v, tables, lens = _make(case, torch.float32, triton_device(), seed=7)
    longest = max(case[-1])
    max_len = {"exact": longest, "loose": 2 * longest, "one partition": 128}[bound]
    out = _triton(monkeypatch, q, k, v, tables, lens, 20, max_context_len=max_len,
                  partition=128 if bound == "one partition" else 16, block_n=16)
    assert_close(out, _ref(q, k, v, tables, lens, 20), torch.float32)


@pytest.mark.parametrize("window", [None, 50])
def test_triton_long_context(monkeypatch, window):
    """19 partitions of 16: the reduce walks them in two tiles of 16."""
    q, k, v, tables, lens = _make((2, 2, 1, 16, 8, [300, 33]), torch.float32, triton_device(),
                                  seed=9)
    out = _triton(monkeypatch, q, k, v, tables, lens, window, partition=16, block_n=16)
    assert_close(out, _ref(q, k, v, tables, lens, window), torch.float32)


@pytest.mark.parametrize("window", [7, 20])
def test_triton_skips_blocks_before_the_window(monkeypatch, window):
    """K/V blocks wholly before a sequence's window hold NaN: one of them read into the softmax
    (even with weight 0) would make the output NaN."""
    case = CASES[-1]
    q, k, v, tables, lens = _make(case, torch.float32, triton_device(), seed=8)
    ref = _ref(q, k, v, tables, lens, window)
    block_size = case[4]
    for s, n in enumerate(case[-1]):
        stale = tables[s, :max(0, n - window) // block_size].long()
        k[stale], v[stale] = float("nan"), float("nan")
    out = _triton(monkeypatch, q, k, v, tables, lens, window, partition=16, block_n=16)
    assert_close(out, ref, torch.float32)


def test_triton_rejects_int64_tables():
    pytest.importorskip("triton")
    from sparse_serve.kernels import paged_attention_triton

    q, k, v, tables, lens = _make(CASES[0], torch.float32, triton_device(), seed=1)
    with pytest.raises(AssertionError):
        paged_attention_triton.paged_attention_decode_triton(q, k, v, tables.long(), lens, 1.0)
