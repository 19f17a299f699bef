"""4-bit rows (`--quantization int4` / `w4a8`; kernels/int4_rows.py, kernels/csrc/int4_rows.h): the
format, the quantizer, and the native kernels on 4-bit rows against the same kernels on the int8
values the rows stand for (the integer sums make them equal bit for bit) and against the torch
references."""

import pytest
import torch

from sparse_serve.kernels import cpu_native, sparse_ffn_cpu
from sparse_serve.kernels.activation_grid import on_grid
from sparse_serve.kernels.activations import ACTIVATIONS
from sparse_serve.kernels.int4_rows import (
    GROUP,
    MAX_CODE,
    MAX_VALUE,
    keep_logical_shape,
    logical_numel,
    num_groups,
    pack_int4,
    quantize_int4,
    row_bytes,
    unpack_int4,
)
from sparse_serve.kernels.linear_int8_cpu import linear_int8_native, linear_int8_ref
from sparse_serve.kernels.sparse_ffn_ref import RowScales, dequantize, sparse_ffn_ref
from tests.kernels.kernel_cases import (
    SPARSITIES,
    THRESHOLD,
    ffn_weights,
    poison_allocations,
    predicted_mask,
)
from tests.kernels.test_sparse_ffn_int8_cpu import assert_close_on_grid

native = pytest.mark.skipif(not cpu_native.available(), reason="native CPU kernel could not be built (no g++?)")


def test_format_values_and_padding():
    """Each stored value is m * (c - 8) with the group's multiplier; a row's pad decodes to 0."""
    v = torch.randn(5, 70) * 30
    packed = pack_int4(v)
    assert packed.dtype == torch.uint8 and packed.shape == (5, row_bytes(70)) == (5, 3 * 17)
    groups = num_groups(70)
    m = packed[:, groups * 16:].long()                                     # [5, 3]
    assert ((m >= 1) & (m <= 16)).all()
    nibbles = packed[:, :groups * 16].reshape(5, groups, 16).long()
    codes = torch.cat([nibbles & 15, nibbles >> 4], dim=-1) - 8            # [5, 3, 32]
    assert codes.abs().max() <= MAX_CODE
    assert (codes.reshape(5, -1)[:, 70:] == 0).all()                       # the pad
    values = unpack_int4(packed, 70)
    assert values.dtype == torch.int8 and values.shape == (5, 70)
    assert torch.equal(values.long(), (codes * m[..., None]).reshape(5, -1)[:, :70])
    assert values.abs().max() <= MAX_VALUE


def test_quantizer_error():
    """Per group, the chosen multiplier's squared error is at most the non-clipping multiplier's
    (the search starts there), so every group's error is bounded by its rounding; and the whole
    weight comes back to within ~1% relative mean squared error on Gaussian rows."""
    torch.manual_seed(0)
    w = torch.randn(64, 576)
    w[3, 100] = 40.0                                                       # an outlier row
    packed, scale = quantize_int4(w)
    back = unpack_int4(packed, 576).float() * scale[:, None]
    v = (w / scale[:, None]).view(64, -1, GROUP)
    top = torch.ceil(v.abs().amax(-1) / MAX_CODE).clamp(1, 16)
    bound = ((torch.round(v / top[..., None]).clamp(-7, 7) * top[..., None] - v) ** 2).sum(-1)
    err = ((back / scale[:, None]).view(64, -1, GROUP) - v).pow(2).sum(-1)
    assert (err <= bound * (1 + 1e-5) + 1e-6).all()
    rel = ((back - w) ** 2).mean() / (w ** 2).mean()
    assert rel < 0.012, rel
    # per column (the FFN's w_down_t): scales [K], groups still along K
    packed_c, scale_c = quantize_int4(w, dim=1)
    assert scale_c.shape == (576,)
    back_c = unpack_int4(packed_c, 576).float() * scale_c[None, :]
    assert ((back_c - w) ** 2).mean() / (w ** 2).mean() < 0.03


def test_zero_rows_and_logical_shape():
    packed, scale = quantize_int4(torch.zeros(3, 40))
    assert (unpack_int4(packed, 40) == 0).all() and (scale == 1).all()
    assert logical_numel(packed) == packed.numel()
    assert logical_numel(keep_logical_shape(packed, (3, 40))) == 120


@native
@pytest.mark.parametrize("x_bits", [16, 8])
@pytest.mark.parametrize("m,k,n", [(1, 576, 100), (1, 70, 9), (6, 40, 13), (16, 600, 37), (65, 96, 8)])
def test_linear_on_4bit_rows(m, k, n, x_bits):
    """The native linear reading 4-bit rows = the native linear on their int8 values, bit for bit,
    and the torch reference to fp32 rounding; `out` poisoned first."""
    torch.manual_seed(m * 1000 + k)
    w = torch.randn(n, k)
    packed, scale = quantize_int4(w)
    x = torch.randn(m, k)
    out = torch.full((m, n), float("nan"))
    linear_int8_native(x, packed, scale, out=out, x_bits=x_bits)
    on_int8 = linear_int8_native(x, unpack_int4(packed, k).contiguous(), scale, x_bits=x_bits)
    assert torch.equal(out, on_int8)
    ref = linear_int8_ref(x, packed, scale, x_bits)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@native
def test_corrupt_multiplier_clamps_alike():
    """A multiplier byte past 16 (not written by the quantizer) decodes as 16 in the kernel and in
    unpack_int4 alike."""
    packed, scale = quantize_int4(torch.randn(4, 64))
    packed[:, 2 * 16] = 200                                                # group 0's multiplier
    x = torch.randn(2, 64)
    assert torch.equal(linear_int8_native(x, packed, scale),
                       linear_int8_native(x, unpack_int4(packed, 64).contiguous(), scale))


def ffn_4bit(T: int, H: int, I: int, seed: int, x_bits: int):
    """x and the FFN's 4-bit rows as quantize_mlp makes them (a scale per neuron for all three),
    their int8 values, and the RowScales."""
    x, wg, wu, wd = ffn_weights(T, H, I, torch.float32, torch.Generator().manual_seed(seed))
    wd[:, :3] *= 20.0                                                      # outlier hidden channels
    (gq, gs), (uq, us), (dq, ds) = quantize_int4(wg), quantize_int4(wu), quantize_int4(wd)
    packed = [gq, uq, dq]
    values = [unpack_int4(p, H).contiguous() for p in packed]
    return x, packed, values, RowScales(gs, us, ds, x_bits)


def assert_mask_close(active, ref_active, x, packed, scales, act):
    """Masks equal but where the gate's decision sits within fp32 rounding of its threshold, or up
    is within rounding of 0 (the kernel's exact integer dot may be 0 where the reference's fp32
    matmul of dequantized weights leaves 1e-8: likely with 15 levels a weight)."""
    assert active.view(torch.uint8).max().item() <= 1, "mask holds poison (never written)"
    xg = on_grid(x, scales.x_bits).double()
    H = x.shape[1]
    g = xg @ dequantize(packed[0], scales.gate, k=H).double().t()
    u = xg @ dequantize(packed[1], scales.up, k=H).double().t()
    thr = THRESHOLD[act]
    margin = {"silu": torch.nn.functional.silu(g).abs() - thr, "relu": g, "fatrelu": g - thr,
              "drelu": torch.minimum(g.abs(), u.abs())}[act]
    near = torch.minimum(margin.abs(), u.abs()) < 1e-4 * g.abs().max()
    assert not ((active != ref_active) & ~near).any(), f"{(active != ref_active).sum()} mismatches"


def run_native(x, weights, act, predicted, scales):
    rows = torch.full((3,), -1, dtype=torch.int64)
    out, active = sparse_ffn_cpu.sparse_ffn_native(x, *weights, act, THRESHOLD[act], predicted, rows,
                                                   row_scales=scales)
    return out, active, rows.tolist()


@native
@pytest.mark.parametrize("x_bits", [16, 8])
@pytest.mark.parametrize("sparsity", [None, *SPARSITIES])
@pytest.mark.parametrize("shape", [(1, 77, 130), (1, 64, 300), (4, 256, 96), (16, 96, 70), (33, 40, 65)], ids=str)
def test_sparse_ffn_on_4bit_rows(monkeypatch, shape, sparsity, x_bits):
    """4-bit rows take the int8 rows' paths (one row: the row path; 2+: the tiles), each row
    decoded as it is read, down scaled per neuron: against the reference on the same rows to the
    int8 path's tolerance, and reading the rows the kernel reads on the int8 values (with down's
    scales per channel there: the rows read do not depend on them)."""
    T, H, I = shape
    x, packed, values, scales = ffn_4bit(T, H, I, seed=hash((shape, sparsity)) % 2**31, x_bits=x_bits)
    pred = None if sparsity is None else predicted_mask(T, I, sparsity, torch.Generator().manual_seed(1))
    poison_allocations(monkeypatch, sparse_ffn_cpu)
    for act in ACTIVATIONS:
        out, active, rows = run_native(x, packed, act, pred, scales)
        per_channel = scales._replace(down=torch.ones(H))
        _, active8, rows8 = run_native(x, values, act, pred, per_channel)
        assert torch.equal(active, active8) and rows == rows8
        ref, ref_active = sparse_ffn_ref(x, *packed, act, THRESHOLD[act], pred, row_scales=scales)
        assert_close_on_grid(out, ref)
        assert_mask_close(active, ref_active, x, packed, scales, act)
