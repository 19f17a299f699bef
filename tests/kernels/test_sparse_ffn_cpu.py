"""CPU sparse FFN paths (native kernel, stock-torch path, dispatcher) vs the torch reference."""

import importlib

import pytest
import torch

from sparse_serve.kernels import cpu_native, sparse_ffn_cpu
from sparse_serve.kernels.activations import ACTIVATIONS
from sparse_serve.kernels.sparse_ffn import default_dense_fallback, sparse_ffn
from sparse_serve.kernels.sparse_ffn_ref import sparse_ffn_ref
from tests.kernels.kernel_cases import (
    DTYPES,
    SPARSITIES,
    THRESHOLD,
    assert_close,
    assert_mask_equal,
    ffn_weights,
    poison_allocations,
    predicted_mask,
    record_routes,
)

dispatch = importlib.import_module("sparse_serve.kernels.sparse_ffn")

# (T, H, I): batch 1, > 1 and the native maximum; H off the 32/16/8-wide vector loops. (1, 40, 600)
# spans several neuron chunks of the batch-1 path (kRowChunk 256); (16, 600, 50) several hidden
# blocks of phase 2 (kOutBlockBytes: 256 floats at 16 rows) with a remainder.
SHAPES = [(1, 77, 130), (1, 40, 600), (4, 256, 96), (16, 600, 50), (64, 40, 33)]

needs_native = pytest.mark.skipif(not cpu_native.available(),
                                  reason="native CPU kernel could not be built (no g++?)")


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_predicted(monkeypatch, shape, sparsity, dtype):
    T, H, I = shape
    gen = torch.Generator().manual_seed(hash((shape, sparsity)) % 2**31)
    x, wg, wu, wd = ffn_weights(T, H, I, dtype, gen)
    pred = predicted_mask(T, I, sparsity, gen)
    poison_allocations(monkeypatch, sparse_ffn_cpu)
    for act in ACTIVATIONS:
        out, active = sparse_ffn_cpu.sparse_ffn_native(x, wg, wu, wd, act, THRESHOLD[act], pred)
        ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, act, THRESHOLD[act], pred)
        assert_close(out, ref, dtype)
        assert_mask_equal(active, ref_active)
        if sparsity == 1.0:
            assert out.abs().max().item() == 0.0


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_exact(monkeypatch, shape, act, dtype):
    T, H, I = shape
    x, wg, wu, wd = ffn_weights(T, H, I, dtype, torch.Generator().manual_seed(9))
    poison_allocations(monkeypatch, sparse_ffn_cpu)
    out, active = sparse_ffn_cpu.sparse_ffn_native(x, wg, wu, wd, act, THRESHOLD[act])
    ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, act, THRESHOLD[act])
    assert_close(out, ref, dtype)
    assert_mask_equal(active, ref_active)
    assert 0 < ref_active.sum() < ref_active.numel()


@needs_native
@pytest.mark.parametrize("T", [1, 4])
def test_native_is_deterministic(T):
    """Identical calls give bitwise identical outputs, whichever thread ran which neurons."""
    gen = torch.Generator().manual_seed(5)
    x, wg, wu, wd = ffn_weights(T, 64, 2000, torch.float32, gen)  # 8 neuron chunks at batch 1
    for pred in (predicted_mask(T, 2000, 0.7, gen), None):
        first, _ = sparse_ffn_cpu.sparse_ffn_native(x, wg, wu, wd, "silu", 0.05, pred)
        for _ in range(20):
            out, _ = sparse_ffn_cpu.sparse_ffn_native(x, wg, wu, wd, "silu", 0.05, pred)
            assert torch.equal(out, first)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_torch_path(sparsity, act):
    # float32 only: the torch path computes in the weights' dtype, so a 16-bit run may flip a
    # neuron sitting on the threshold; float32 must match the reference exactly.
    gen = torch.Generator().manual_seed(4)
    x, wg, wu, wd = ffn_weights(3, 70, 90, torch.float32, gen)
    for pred in (predicted_mask(3, 90, sparsity, gen), None):
        out, active = sparse_ffn_cpu.sparse_ffn_torch(x, wg, wu, wd, act, THRESHOLD[act], pred)
        ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, act, THRESHOLD[act], pred)
        assert_close(out, ref, torch.float32)
        assert_mask_equal(active, ref_active)


@pytest.mark.parametrize("fallback", [None, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("T", [1, 16, 17, 80])
def test_dispatch_every_route(T, fallback):
    """sparse_ffn gives the reference result whichever path (native, dense) it picks."""
    gen = torch.Generator().manual_seed(T)
    x, wg, wu, wd = ffn_weights(T, 48, 64, torch.float32, gen)
    pred = predicted_mask(T, 64, 0.6, gen)
    for p in (pred, None):
        out, active = sparse_ffn(x, wg, wu, wd, "drelu", predicted=p,
                                 dense_fallback_fraction=fallback)
        ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, "drelu", predicted=p)
        assert_close(out, ref, torch.float32)
        assert_mask_equal(active, ref_active)


def test_dispatch_without_native(monkeypatch):
    monkeypatch.setattr(sparse_ffn_cpu, "native_supported", lambda *a: False)
    gen = torch.Generator().manual_seed(2)
    x, wg, wu, wd = ffn_weights(2, 40, 200, torch.float32, gen)
    for sparsity in (0.5, 0.95):  # dense route, then the gather route
        pred = predicted_mask(2, 200, sparsity, gen)
        out, active = sparse_ffn(x, wg, wu, wd, "relu", predicted=pred)
        ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, "relu", predicted=pred)
        assert_close(out, ref, torch.float32)
        assert_mask_equal(active, ref_active)


def test_reference_matches_explicit_formula():
    """The reference itself against a per-neuron loop written from the definitions."""
    gen = torch.Generator().manual_seed(1)
    x, wg, wu, wd = ffn_weights(2, 12, 10, torch.float32, gen)
    pred = predicted_mask(2, 10, 0.3, gen)
    for act, thr in THRESHOLD.items():
        ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, act, thr, pred)
        out = torch.zeros(2, 12)
        for t in range(2):
            for i in range(10):
                g, u = float(wg[i] @ x[t]), float(wu[i] @ x[t])
                silu = g / (1 + torch.exp(torch.tensor(-g)).item())
                h = {"silu": silu * u if abs(silu) > thr else 0.0, "relu": max(g, 0.0) * u,
                     "drelu": max(g, 0.0) * max(u, 0.0), "fatrelu": g * u if g > thr else 0.0}[act]
                h = h if pred[t, i] else 0.0
                assert bool(ref_active[t, i]) == (h != 0.0)
                out[t] += h * wd[i]
        assert_close(ref, out, torch.float32)


def test_rejects_unknown_activation():
    x, wg, wu, wd = ffn_weights(1, 8, 8, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        sparse_ffn(x, wg, wu, wd, "gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dispatch_plain_swiglu_exact(dtype):
    """Plain SwiGLU (silu, threshold 0) in exact mode: every neuron active, any route."""
    x, wg, wu, wd = ffn_weights(1, 64, 40, dtype, torch.Generator().manual_seed(8))
    out, active = sparse_ffn(x, wg, wu, wd, "silu")
    ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, "silu")
    assert_close(out, ref, dtype)
    assert ref_active.all()
    assert active.all()


@pytest.mark.parametrize("hidden", [64, 576, 2047, 2048, 4096])
def test_default_fallbacks(hidden):
    cpu = torch.device("cpu")
    key = max(h for h in dispatch.CPU_FP32_COMPUTE_BOUND if h <= hidden)
    rows, fraction = dispatch.CPU_FP32_COMPUTE_BOUND[key]
    assert rows == (32 if hidden >= 2048 else 12)   # wider layers stay bandwidth-bound longer
    for T in (1, 2, rows - 1):
        assert default_dense_fallback(cpu, torch.float32, T, hidden) == 1.0
    for T in (rows, 64):
        assert default_dense_fallback(cpu, torch.float32, T, hidden) == fraction < 1.0
    for dtype in (torch.bfloat16, torch.float16):
        assert default_dense_fallback(cpu, dtype, 64, hidden) == 1.0
    assert default_dense_fallback(torch.device("cuda"), torch.float32, 64, hidden) == 1.0


@needs_native
@pytest.mark.parametrize("T, dtype, sparsity, route, hidden", [
    (1, torch.float32, None, "native", 64),    # batch 1 is bandwidth-bound: native at any density
    (1, torch.float32, 0.0, "native", 64),
    (11, torch.float32, None, "native", 64),   # below the compute-bound rows
    (12, torch.float32, None, "dense", 64),    # exact mode counts as every product computed
    (12, torch.float32, 0.5, "dense", 64),     # 50% of the products > 40%
    (16, torch.float32, 0.7, "native", 64),    # 30% of the products
    (64, torch.float32, 0.5, "dense", 64),
    (16, torch.bfloat16, None, "native", 64),  # 16-bit dense is slower at any density
    (16, torch.bfloat16, 0.0, "native", 64),
    (16, torch.float32, None, "native", 2048),  # a wide layer stays bandwidth-bound longer
    (32, torch.float32, 0.5, "native", 2048),   # 50% of the products < 60%
    (32, torch.float32, 0.3, "dense", 2048),
    (32, torch.float32, None, "dense", 2048),
])
def test_dispatch_rule(monkeypatch, T, dtype, sparsity, route, hidden):
    """Default dispatch on the CPU: which path runs, and it still gives the reference result."""
    calls = record_routes(monkeypatch, dense=(dispatch, "dense_ffn"),
                          native=(sparse_ffn_cpu, "sparse_ffn_native"))
    gen = torch.Generator().manual_seed(T)
    x, wg, wu, wd = ffn_weights(T, hidden, 100, dtype, gen)
    pred = None if sparsity is None else predicted_mask(T, 100, sparsity, gen)
    out, active = sparse_ffn(x, wg, wu, wd, "silu", 0.05, predicted=pred)
    ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, "silu", 0.05, pred)
    assert calls == [route]
    assert_close(out, ref, dtype)
    # 16-bit dense computes in the weights' dtype and may flip a neuron on the threshold.
    if dtype == torch.float32:
        assert_mask_equal(active, ref_active)
