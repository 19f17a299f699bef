"""The native int8 linear (kernels/linear_int8_cpu.py) against its torch reference:
random data, decode batches 1..64 and a prefill-sized batch past one 64-row block, K not a
multiple of the vector width, odd N (a partial tile of output rows), float32 and bfloat16
activations, a NaN-poisoned output buffer; and the quantizer's own contract."""
from __future__ import annotations

import pytest
import torch

from sparse_serve.kernels import cpu_native, linear_int8_cpu
from sparse_serve.kernels.activation_grid import on_grid, x_max
from sparse_serve.kernels.linear_int8_cpu import linear_int8_ref, quantize_int8
from tests.kernels.kernel_cases import assert_close

native = pytest.mark.skipif(not cpu_native.available(), reason="the native CPU kernels did not build")

# (M, K, N): K = 100 and 37 leave tails of 4 and 5 past the vector loop, N = 13 and 7 a partial tile
SHAPES = [(1, 64, 32), (1, 100, 13), (3, 37, 7), (16, 100, 13), (64, 96, 33), (70, 50, 9)]
# the 8-bit tiles step 64 wide: K = 128 (none left), 130 and 63 (tails of 2 and 63)
W8A8_SHAPES = [(6, 128, 8), (7, 130, 5), (2, 63, 4)]


def _case(M: int, K: int, N: int, dtype: torch.dtype, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen) / K ** 0.5
    w_q, scale = quantize_int8(w)
    return x, w, w_q, scale


@native
@pytest.mark.parametrize("x_bits", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + W8A8_SHAPES, ids=str)
def test_native_matches_reference(shape, dtype, x_bits):
    x, _, w_q, scale = _case(*shape, dtype)
    ref = linear_int8_ref(x, w_q, scale, x_bits)
    out = torch.full((shape[0], shape[2]), float("nan"), dtype=dtype)
    result = linear_int8_cpu.linear_int8_native(x, w_q, scale, out=out, x_bits=x_bits)
    assert result is out
    assert_close(out, ref, dtype)
    if x_bits == 8:   # a coarser grid than 16 bits: the two results must differ (the grid is used)
        assert not torch.equal(out, linear_int8_cpu.linear_int8_native(x, w_q, scale))


@native
def test_native_reads_strided_input_and_keeps_leading_dims():
    x, _, w_q, scale = _case(8, 40, 11, torch.float32)
    wide = torch.cat([x, torch.randn(8, 24)], dim=1)[:, :40]          # not contiguous
    out = linear_int8_cpu.linear_int8(wide.view(2, 4, 40), w_q, scale)
    assert out.shape == (2, 4, 11)
    assert_close(out.view(8, 11), linear_int8_ref(x, w_q, scale), torch.float32)


def test_quantization_error_and_reference():
    """Per-row symmetric int8: |W - w_q * scale| <= scale / 2 elementwise, each row's largest
    weight maps to +-127, and the product differs from the fp32 one by well under 1%."""
    x, w, w_q, scale = _case(4, 200, 31, torch.float32)
    assert w_q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (31,)
    assert int(w_q.abs().amax(dim=1).min()) == 127
    assert ((w - w_q.float() * scale[:, None]).abs() <= scale[:, None] / 2 + 1e-7).all()
    exact = x @ w.T
    rel = (linear_int8_ref(x, w_q, scale) - exact).norm() / exact.norm()
    assert 0 < rel < 0.01, rel


def test_zero_row_and_fallback_dtype():
    w = torch.randn(3, 16)
    w[1] = 0
    w_q, scale = quantize_int8(w)
    assert scale[1] == 1.0 and (w_q[1] == 0).all()
    x = torch.randn(2, 16, dtype=torch.float16)                         # no native fp16 path
    assert not linear_int8_cpu.native_supported(x)
    out = linear_int8_cpu.linear_int8(x, w_q, scale)
    assert out.dtype == torch.float16 and (out[:, 1] == 0).all()


@native
def test_refuses_bad_layout():
    x, _, w_q, scale = _case(2, 32, 8, torch.float32)
    with pytest.raises(AssertionError):
        linear_int8_cpu.linear_int8_native(x, w_q.t().contiguous().t(), scale)   # not row-major
    with pytest.raises(AssertionError):
        linear_int8_cpu.linear_int8_native(x, w_q.float(), scale)                # not int8


@native
def test_fallback_matches_native(monkeypatch):
    """Where the library did not build, linear_int8 runs the reference: same results."""
    x, _, w_q, scale = _case(5, 70, 9, torch.float32)
    native_out = linear_int8_cpu.linear_int8(x, w_q, scale)
    monkeypatch.setattr(linear_int8_cpu.cpu_native, "available", lambda: False)
    assert not linear_int8_cpu.native_supported(x)
    assert_close(linear_int8_cpu.linear_int8(x, w_q, scale), native_out, torch.float32)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_do_not_depend_on_the_batch(dtype):
    """Each output element is one fixed-order dot product: a row's result is bitwise the same
    alone or in any batch (greedy decoding stays batch invariant under int8)."""
    x, _, w_q, scale = _case(70, 100, 13, dtype)
    for x_bits in (16, 8):
        together = linear_int8_cpu.linear_int8_native(x, w_q, scale, x_bits=x_bits)
        for i in (0, 5, 69):
            alone = linear_int8_cpu.linear_int8_native(x[i:i + 1], w_q, scale, x_bits=x_bits)
            assert torch.equal(alone, together[i:i + 1])
        assert torch.equal(linear_int8_cpu.linear_int8_native(x[3:10], w_q, scale, x_bits=x_bits), together[3:10])


def _identity(K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 weight that returns its input: 127 * I with scale 1/127 per row."""
    return (torch.eye(K) * 127).to(torch.int8), torch.full((K,), 1 / 127)


@native
@pytest.mark.parametrize("x_bits", [16, 8])
@pytest.mark.parametrize("K", [5, 64, 100, 576])
def test_kernel_reads_x_on_the_torch_grid(K, x_bits):
    """Through an identity weight the kernel returns x as it read it: on_grid(x), half a grid
    step (amax / 8191, or / 127) from x at most, with zero rows zero and a NaN poisoning only its row."""
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(K)) * torch.tensor([1, 1e-3, 1e3, 1, 1, 1])[:, None]
    x[3] = 0
    x[4, K // 2] = float("nan")
    x[5, 0] = float("inf")
    out = linear_int8_cpu.linear_int8_native(x, *_identity(K), x_bits=x_bits)
    grid = on_grid(x, x_bits)
    # the same grid point: fp32 rounding of the scales apart (a grid step is ~1e-4 of the row)
    assert torch.allclose(out[:4], grid[:4], rtol=1e-6, atol=0)
    assert (out[3] == 0).all() and out[4:].isnan().all() and grid[4:].isnan().all()
    step = x[:3].abs().amax(dim=1, keepdim=True) / x_max(K, x_bits)
    assert ((grid[:3] - x[:3]).abs() <= step / 2 * (1 + 1e-5)).all()
    assert 0 < (grid[:3] - x[:3]).abs().max()       # a real rounding, not a pass-through


@native
def test_grid_bound_is_the_same_rule_in_both():
    """x_max keeps every int32 lane below 2^31: 8191 up to ~17k per row, less beyond, the same
    number in the kernel and in torch."""
    lib = cpu_native.load()
    for k in (1, 576, 14336, 16912, 16913, 40000, 1 << 20):
        assert lib.int8_rows_x_max(k, 16) == x_max(k), k
        assert lib.int8_rows_x_max(k, 8) == x_max(k, 8) == 127, k
        assert 127 * x_max(k) * -(-k // 8) < 2 ** 31
    assert x_max(14336) == 8191 and x_max(40000) < 8191
