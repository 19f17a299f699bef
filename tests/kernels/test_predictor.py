"""Activation predictor: Triton kernel and the CPU dispatch vs the torch reference."""

import pytest
import torch

from kernels.sparse_ffn import predict_active
from kernels.sparse_ffn_ref import predict_active_ref
from tests.kernels.kernel_cases import DTYPES, poison_allocations, triton_device


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
    from kernels import predictor_triton

    T, H, r, I = shape
    x, fc1, fc2 = _case(T, H, r, I, dtype, seed=T, device=triton_device())
    poison_allocations(monkeypatch, predictor_triton)
    for threshold in (0.0, 0.3):
        pred = predictor_triton.predict_active_triton(x, fc1, fc2, threshold)
        _assert_mask_matches(pred, x, fc1, fc2, threshold, dtype)


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
    from kernels import cpu_native, sparse_ffn_cpu

    if not cpu_native.available():
        pytest.skip("native CPU kernel could not be built (no g++?)")
    x, fc1, fc2 = _case(5, 77, 20, 90, dtype, seed=3)
    poison_allocations(monkeypatch, sparse_ffn_cpu)
    _assert_mask_matches(sparse_ffn_cpu.predict_active_native(x, fc1, fc2, 0.1), x, fc1, fc2,
                         0.1, dtype)
