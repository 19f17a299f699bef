"""Activation predictor: Triton kernel and the CPU dispatch vs the torch reference."""

import pytest
import torch

from sparse_serve.kernels import sparse_ffn_ref
from sparse_serve.kernels.sparse_ffn import group_counts_for, new_group_counts, predict_active
from sparse_serve.kernels.sparse_ffn_ref import predict_active_ref
from tests.kernels.kernel_cases import DTYPES, POISON_INT, poison_allocations, triton_device


def _case(T, H, r, I, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    fc1 = torch.randn(r, H, generator=gen) / H ** 0.5
    fc2 = torch.randn(I, r, generator=gen) / r ** 0.5
    return [t.to(dtype).to(device) for t in (x, fc1, fc2)]


def _assert_mask_matches(pred, x, fc1, fc2, threshold, dtype):
    ref = predict_active_ref(x, fc1, fc2, threshold)
    assert pred.dtype == torch.bool and pred.shape == ref.shape
    assert pred.view(torch.uint8).max().item() <= 1, "mask holds poison (never written)"
    mismatch = pred.cpu() != ref.cpu()
    if dtype == torch.float32:
        assert not mismatch.any()
    else:
        # 16-bit rounding of the hidden layer may flip logits that sit on the threshold only.
        logits = torch.relu(x.float() @ fc1.float().t()) @ fc2.float().t()
        margins = (logits - threshold).abs().cpu()[mismatch]
        assert margins.numel() == 0 or margins.max().item() < 0.05, margins
    assert 0 < ref.sum() < ref.numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 100, 24, 70), (6, 64, 40, 130)], ids=str)
def test_triton_predictor(monkeypatch, shape, dtype):
    pytest.importorskip("triton")
    from sparse_serve.kernels import predictor_triton

    T, H, r, I = shape
    x, fc1, fc2 = _case(T, H, r, I, dtype, seed=T, device=triton_device())
    poison_allocations(monkeypatch, predictor_triton)
    for threshold in (0.0, 0.3):
        pred = predictor_triton.predict_active_triton(x, fc1, fc2, threshold)
        _assert_mask_matches(pred, x, fc1, fc2, threshold, dtype)


@pytest.mark.parametrize("shape", [(1, 100, 24, 70), (5, 64, 40, 130)], ids=str)
def test_triton_predictor_with_own_fc1_tiles(monkeypatch, shape):
    # fc1 and fc2 tiled differently (narrow fc1 tiles: more programs over its few outputs),
    # several programs and loop steps in each.
    pytest.importorskip("triton")
    from sparse_serve.kernels import predictor_triton

    T, H, r, I = shape
    x, fc1, fc2 = _case(T, H, r, I, torch.float32, seed=r, device=triton_device())
    config = predictor_triton.PredictorConfig(block_n=16, block_k=16, warps=4, fc1_block_n=2,
                                              fc1_block_k=32, fc1_warps=2)
    poison_allocations(monkeypatch, predictor_triton)
    counts = new_group_counts(I, x.device).fill_(POISON_INT)
    pred = predictor_triton.predict_active_triton(x, fc1, fc2, 0.1, config=config,
                                                  group_counts=counts)
    _assert_mask_matches(pred, x, fc1, fc2, 0.1, torch.float32)
    assert torch.equal(counts.cpu(), sparse_ffn_ref.group_counts_ref(pred.cpu()))


@pytest.mark.parametrize("shape, max_groups", [((1, 40, 16, 300), 256), ((3, 32, 8, 700), 2),
                                               ((6, 24, 8, 130), 256)], ids=str)
def test_triton_predictor_counts_groups(monkeypatch, shape, max_groups):
    # Counts of the mask it wrote, per group of 128 neurons (256 where max_groups 2 widens them),
    # into a poisoned buffer: the first launch must zero it. Twice, as a layer is called again.
    pytest.importorskip("triton")
    from sparse_serve.kernels import predictor_triton

    monkeypatch.setattr(sparse_ffn_ref, "MAX_PREDICTION_GROUPS", max_groups)
    T, H, r, I = shape
    x, fc1, fc2 = _case(T, H, r, I, torch.float32, seed=I, device=triton_device())
    counts = new_group_counts(I, x.device).fill_(POISON_INT)
    # (a negative threshold: the padded rows and columns, whose logits are 0, must not count)
    for threshold in (0.2, -0.3, 0.0):
        pred = predictor_triton.predict_active_triton(x, fc1, fc2, threshold, group_counts=counts)
        _assert_mask_matches(pred, x, fc1, fc2, threshold, torch.float32)
        assert torch.equal(counts.cpu(), sparse_ffn_ref.group_counts_ref(pred.cpu()))


def test_cpu_predictor_counts_groups():
    x, fc1, fc2 = _case(2, 48, 8, 300, torch.float32, seed=4)
    counts = new_group_counts(300, x.device).fill_(POISON_INT)
    pred = predict_active(x, fc1, fc2, 0.1, group_counts=counts)
    assert counts.tolist() == [int(pred[:, i:i + 128].any(0).sum()) for i in (0, 128, 256)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_predictor(dtype):
    x, fc1, fc2 = _case(3, 80, 16, 50, dtype, seed=1)
    _assert_mask_matches(predict_active(x, fc1, fc2, 0.1), x, fc1, fc2, 0.1, dtype)


def test_predictor_rejects_mismatched_shapes():
    x, fc1, fc2 = _case(1, 32, 8, 20, torch.float32, seed=2)
    with pytest.raises(AssertionError):
        predict_active(x, fc1, fc2.t().contiguous())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_cpu_predictor(monkeypatch, dtype):
    from sparse_serve.kernels import cpu_native, sparse_ffn_cpu

    if not cpu_native.available():
        pytest.skip("native CPU kernel could not be built (no g++?)")
    x, fc1, fc2 = _case(5, 77, 20, 90, dtype, seed=3)
    poison_allocations(monkeypatch, sparse_ffn_cpu)
    _assert_mask_matches(sparse_ffn_cpu.predict_active_native(x, fc1, fc2, 0.1), x, fc1, fc2,
                         0.1, dtype)


def test_group_counts_are_asked_for_only_where_the_kernels_use_them():
    assert group_counts_for(torch.zeros(1, 8), 300) is None   # CPU: the native kernel lists its own


@pytest.mark.parametrize("T", [1, 5, 64])
def test_int8_cpu_predictor(monkeypatch, T):
    """int8 fc1/fc2 with per-row scales (`--quantization int8`): the native kernel and the
    dispatch give the reference's mask on the same int8 weights, and the int8 model's logits
    stay within a few int8 steps of the fp32 weights' (a wrong scale would move them by O(1))."""
    from sparse_serve.kernels import cpu_native, sparse_ffn_cpu
    from sparse_serve.kernels.linear_int8_cpu import quantize_int8

    x, fc1, fc2 = _case(T, 77, 20, 90, torch.float32, seed=T)
    (q1, s1), (q2, s2) = quantize_int8(fc1), quantize_int8(fc2)
    ref = predict_active_ref(x, q1, q2, 0.1, scales=(s1, s2))
    assert 0 < ref.sum() < ref.numel()
    poison_allocations(monkeypatch, sparse_ffn_cpu)
    paths = [predict_active(x, q1, q2, 0.1, scales=(s1, s2))]
    if cpu_native.available():
        paths.append(sparse_ffn_cpu.predict_active_native(x, q1, q2, 0.1, scales=(s1, s2)))
    for pred in paths:
        assert pred.view(torch.uint8).max().item() <= 1, "mask holds poison (never written)"
        assert torch.equal(pred, ref)
    dequantized = torch.relu(x @ (q1.float() * s1[:, None]).t()) @ (q2.float() * s2[:, None]).t()
    exact = torch.relu(x @ fc1.t()) @ fc2.t()
    assert (dequantized - exact).abs().max() < 0.05
    with pytest.raises(AssertionError, match="need their scales"):
        sparse_ffn_cpu.linear_native(x, q1)


@pytest.mark.parametrize("shape", [(1, 100, 24, 70), (6, 64, 40, 130)], ids=str)
def test_triton_predictor_int8(monkeypatch, shape):
    """int8 fc1/fc2 with per-row scales through the Triton predictor: the reference's mask on the
    same int8 weights, and the group counts of that mask (bench/gpu_e2e.py's sparse-int8pred)."""
    pytest.importorskip("triton")
    from sparse_serve.kernels import predictor_triton
    from sparse_serve.kernels.linear_int8_cpu import quantize_int8
    from sparse_serve.kernels.sparse_ffn_ref import group_counts_ref

    T, H, r, I = shape
    x, fc1, fc2 = _case(T, H, r, I, torch.float32, seed=T)
    (q1, s1), (q2, s2) = quantize_int8(fc1), quantize_int8(fc2)
    device = triton_device()
    x, q1, q2, s1, s2 = (t.to(device) for t in (x, q1, q2, s1, s2))
    poison_allocations(monkeypatch, predictor_triton)
    for threshold in (0.0, 0.3):
        counts = new_group_counts(I, device).fill_(POISON_INT)
        pred = predictor_triton.predict_active_triton(x, q1, q2, threshold, group_counts=counts,
                                                      scales=(s1, s2))
        ref = predict_active_ref(x, q1, q2, threshold, scales=(s1, s2))
        assert pred.view(torch.uint8).max().item() <= 1
        assert torch.equal(pred.cpu(), ref.cpu()) and 0 < ref.sum() < ref.numel()
        assert torch.equal(counts.cpu(), group_counts_ref(ref).cpu())
    with pytest.raises(AssertionError, match="per-row scales"):
        predictor_triton.predict_active_triton(x, q1, q2)
