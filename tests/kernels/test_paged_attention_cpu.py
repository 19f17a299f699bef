"""The native CPU paged-attention decode (kernels/paged_attention_cpu.py) against the torch
reference: random data, the shapes and windows of test_paged_attention.py, float32 and bfloat16,
a NaN-poisoned output buffer, and NaN in every cache row it must not read (positions past a
sequence's context or before its window, and unused blocks)."""
from __future__ import annotations

import pytest
import torch

from sparse_serve.kernels import cpu_native, paged_attention_cpu
from sparse_serve.kernels.paged_attention_ref import paged_attention_decode_ref
from tests.kernels.kernel_cases import assert_close
from tests.kernels.test_paged_attention import CASES, WINDOWS, _make

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="the native CPU kernels did not build")


def _poison_unread(k, v, tables, lens, window):
    """NaN everywhere, then the rows the kernel may read copied back from the clean cache."""
    k_p, v_p = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    block_size = k.shape[1]
    for s, n in enumerate(lens.tolist()):
        for p in range(max(0, n - window) if window else 0, n):
            block, off = int(tables[s, p // block_size]), p % block_size
            k_p[block, off], v_p[block, off] = k[block, off], v[block, off]
    return k_p, v_p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_native_matches_reference(case, window, dtype):
    q, k, v, tables, lens = _make(case, dtype, "cpu", seed=21)
    scale = q.shape[-1] ** -0.5
    ref = paged_attention_decode_ref(q, k, v, tables, lens, scale, window)
    k_p, v_p = _poison_unread(k, v, tables, lens, window)
    out = torch.full_like(q, float("nan"))
    paged_attention_cpu.paged_attention_decode_native(q, k_p, v_p, tables, lens, scale, window, out=out)
    assert_close(out, ref, dtype)


def test_supported_and_refused():
    q = torch.zeros(1, 2, 8)
    cache = torch.zeros(3, 4, 1, 8)
    assert paged_attention_cpu.native_supported(q, cache, cache)
    assert paged_attention_cpu.native_supported(q.bfloat16(), cache.bfloat16(), cache.bfloat16())
    assert not paged_attention_cpu.native_supported(q.half(), cache.half(), cache.half())     # no fp16 path
    assert not paged_attention_cpu.native_supported(q, cache.transpose(0, 1), cache)          # not contiguous
    tables, lens = torch.zeros(1, 3, dtype=torch.int32), torch.tensor([13], dtype=torch.int32)
    with pytest.raises(AssertionError, match="context_lens"):                                # 13 > 3 * 4
        paged_attention_cpu.paged_attention_decode_native(q, cache, cache, tables, lens, 1.0)
