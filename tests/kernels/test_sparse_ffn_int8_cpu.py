"""The native CPU sparse FFN on int8 weights (`--quantization int8` / `w8a8`) vs the torch
reference on the same int8 weights, dequantized: outputs, masks, rows read, prefill chunks."""

import pytest
import torch

from sparse_serve.kernels import cpu_native, sparse_ffn_cpu
from sparse_serve.kernels import sparse_ffn as dispatch
from sparse_serve.kernels.activation_grid import on_grid
from sparse_serve.kernels.activations import ACTIVATIONS
from sparse_serve.kernels.linear_int8_cpu import quantize_int8
from sparse_serve.kernels.sparse_ffn_ref import (
    RowScales,
    apply_activation,
    dense_ffn,
    dequantize,
    sparse_ffn_ref,
)
from tests.kernels.kernel_cases import (
    SPARSITIES,
    THRESHOLD,
    assert_mask_equal,
    ffn_weights,
    poison_allocations,
    predicted_mask,
    record_routes,
)

pytestmark = pytest.mark.skipif(not cpu_native.available(),
                                reason="native CPU kernel could not be built (no g++?)")

# (T, H, I): batch 1 (the float kernels' row path) over several neuron chunks; batches > 1 (the
# int8 tiles) with row counts off the tile heights (6 for gate/up, 4 for down), several neuron
# chunks (64), and H off the 16-wide vectors (phase 2's scalar tail).
SHAPES = [(1, 77, 130), (1, 40, 600), (4, 256, 96), (5, 96, 70), (16, 600, 50), (33, 128, 300), (64, 40, 33)]


def assert_close_on_grid(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Kernel against reference for int8 weights. h is computed, then put on its 16-bit grid: a
    value an fp32 rounding apart in the two may round to neighbouring grid points, each such
    element moving the output by one grid step (1/8191 of its row's largest |h|) times a down
    weight. Measured: up to 7e-5 of the output's scale (fp32 rounding alone: 1.5e-6); a wrong
    scale or a missing neuron moves it by 1e-2 or more."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype)
    assert torch.isfinite(out).all(), "non-finite output (an element was never written?)"
    scale = max(1.0, ref.float().abs().max().item())
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= 2e-4 * scale, f"max error {err} > 2e-4 * {scale}"


def int8_ffn(T: int, H: int, I: int, seed: int, x_bits: int = 16):
    """x [T, H] fp32, the int8 weights [I, H] as quantize_mlp makes them (gate/up per row, down
    per column), their RowScales (x on an x_bits grid for gate and up), and the same weights
    dequantized to fp32."""
    x, wg, wu, wd = ffn_weights(T, H, I, torch.float32, torch.Generator().manual_seed(seed))
    # a few outlier hidden channels, as in a real residual stream: per-column down scales
    # must keep them, and everything else, exact to the int8 step
    wd[:, :3] *= 20.0
    (gq, gs), (uq, us) = quantize_int8(wg), quantize_int8(wu)
    dq_t, ds = quantize_int8(wd.t())                                      # [H, I], [H]
    weights = [gq, uq, dq_t.t().contiguous()]
    scales = RowScales(gs, us, ds, x_bits)
    dequantized = [dequantize(gq, gs), dequantize(uq, us), dequantize(weights[2], ds, dim=1)]
    return x, weights, scales, dequantized


def expected_rows(x, weights, scales, dequantized, act, predicted) -> list[int]:
    """The rows the int8 kernel reads. Batch 1 runs the float kernels' row path (prefetches
    included): the float kernel on the dequantized weights and x on its grid reads the same rows.
    Batches > 1 run the int8 tiles, which prefetch only rows they then read: gate rows of the
    candidates, up rows where some (predicted) row's gate let the neuron through, down rows of
    neurons active in some row."""
    xg = on_grid(x, scales.x_bits)
    if x.shape[0] == 1:
        return run_native(xg, dequantized, act, predicted, None)[2]
    g = xg @ dequantize(weights[0], scales.gate).t()                      # [T, I]
    passed = apply_activation(g, torch.ones_like(g), act, THRESHOLD[act]) != 0
    candidates = torch.ones_like(passed) if predicted is None else predicted
    _, active = sparse_ffn_ref(x, *weights, act, THRESHOLD[act], predicted, row_scales=scales)
    return [int(candidates.any(0).sum()), int((passed & candidates).any(0).sum()), int(active.any(0).sum())]


def run_native(x, weights, act, predicted, scales):
    rows = torch.full((3,), -1, dtype=torch.int64)
    out, active = sparse_ffn_cpu.sparse_ffn_native(x, *weights, act, THRESHOLD[act], predicted, rows,
                                                   row_scales=scales)
    return out, active, rows.tolist()


@pytest.mark.parametrize("x_bits", [16, 8])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_predicted(monkeypatch, shape, sparsity, x_bits):
    T, H, I = shape
    x, weights, scales, dequantized = int8_ffn(T, H, I, seed=hash((shape, sparsity)) % 2**31, x_bits=x_bits)
    pred = predicted_mask(T, I, sparsity, torch.Generator().manual_seed(1))
    poison_allocations(monkeypatch, sparse_ffn_cpu)
    for act in ACTIVATIONS:
        out, active, rows = run_native(x, weights, act, pred, scales)
        ref, ref_active = sparse_ffn_ref(x, *weights, act, THRESHOLD[act], pred, row_scales=scales)
        assert_close_on_grid(out, ref)
        assert_mask_equal(active, ref_active)
        assert rows == expected_rows(x, weights, scales, dequantized, act, pred)
        if sparsity == 1.0:
            assert out.abs().max().item() == 0.0 and rows[1:] == [0, 0]


@pytest.mark.parametrize("x_bits", [16, 8])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_exact(monkeypatch, shape, act, x_bits):
    T, H, I = shape
    x, weights, scales, dequantized = int8_ffn(T, H, I, seed=9, x_bits=x_bits)
    poison_allocations(monkeypatch, sparse_ffn_cpu)
    out, active, rows = run_native(x, weights, act, None, scales)
    ref, ref_active = sparse_ffn_ref(x, *weights, act, THRESHOLD[act], row_scales=scales)
    assert_close_on_grid(out, ref)
    assert_mask_equal(active, ref_active)
    assert 0 < ref_active.sum() < ref_active.numel()
    assert rows == expected_rows(x, weights, scales, dequantized, act, None)
    # the reference's dequantization is the int8 model: far from the fp32 weights it came from
    # would mean a wrong scale axis (the outlier channels make per-row down scales visibly worse)
    fp32 = ffn_weights(T, H, I, torch.float32, torch.Generator().manual_seed(9))
    fp32[3][:, :3] *= 20.0
    ref_fp32, _ = sparse_ffn_ref(*fp32, act, THRESHOLD[act], None)
    assert (ref - ref_fp32).abs().max() <= 0.05 * max(1.0, ref_fp32.abs().max().item())


@pytest.mark.parametrize("T", [63, 64, 65, 150])
def test_int8_prefill_runs_in_chunks(monkeypatch, T):
    """Beyond the kernel's 64 rows, sparse_ffn runs it per chunk of 64 rows and sums the rows
    each chunk read; there is no int8 BLAS to fall back to."""
    x, weights, scales, _ = int8_ffn(T, 48, 80, seed=T)
    pred = predicted_mask(T, 80, 0.5, torch.Generator().manual_seed(2))
    calls = record_routes(monkeypatch, dense=(dispatch, "dense_ffn"),
                          native=(sparse_ffn_cpu, "sparse_ffn_native"))
    for p in (pred, None):
        calls.clear()
        rows = torch.full((3,), -1, dtype=torch.int64)
        out, active = dispatch.sparse_ffn(x, *weights, "relu", predicted=p, rows_read=rows, row_scales=scales)
        ref, ref_active = sparse_ffn_ref(x, *weights, "relu", predicted=p, row_scales=scales)
        assert calls == ["native"] * -(-T // 64)
        assert_close_on_grid(out, ref)
        assert_mask_equal(active, ref_active)
        expected = [0, 0, 0]
        for start in range(0, T, 64):
            chunk = run_native(x[start:start + 64], weights, "relu",
                               None if p is None else p[start:start + 64], scales)[2]
            expected = [a + b for a, b in zip(expected, chunk)]
        assert rows.tolist() == expected


def test_int8_dense_fallback_and_dense_path():
    """A dense fallback asked for (or the eager dense path) dequantizes: same result, all rows."""
    x, weights, scales, _ = int8_ffn(4, 40, 60, seed=3)
    ref, ref_active = sparse_ffn_ref(x, *weights, "silu", 0.05, row_scales=scales)
    rows = torch.full((3,), -1, dtype=torch.int64)
    out, active = dispatch.sparse_ffn(x, *weights, "silu", 0.05, dense_fallback_fraction=0.0,
                                      rows_read=rows, row_scales=scales)
    assert_close_on_grid(out, ref)
    assert_mask_equal(active, ref_active)
    assert rows.tolist() == [60, 60, 60]
    out, active = dense_ffn(x, *weights, "silu", 0.05, row_scales=scales)
    assert_close_on_grid(out, ref)
    assert_mask_equal(active, ref_active)


def test_int8_needs_its_scales():
    x, weights, scales, dequantized = int8_ffn(2, 32, 40, seed=4)
    with pytest.raises(AssertionError, match="need their scales"):
        sparse_ffn_cpu.sparse_ffn_native(x, *weights, "relu", row_scales=None)
    with pytest.raises(AssertionError, match="scales given"):
        sparse_ffn_cpu.sparse_ffn_native(x, *dequantized, "relu", row_scales=scales)
    wrong_axis = scales._replace(down=torch.ones(40))                   # per row, not per column
    with pytest.raises(AssertionError):
        sparse_ffn_cpu.sparse_ffn_native(x, *weights, "relu", row_scales=wrong_axis)
