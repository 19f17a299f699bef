"""Shared helpers for the kernel tests: devices, tolerances, data, poisoned allocations."""

from __future__ import annotations

import os
import types

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
# Relative to max(1, |reference|.max()): the kernels accumulate in float32 like the reference,
# so the error is the final rounding to the output dtype plus summation order.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
POISON_INT = 7
# Per activation: a threshold that makes both branches of the activation occur on O(1) data.
THRESHOLD = {"silu": 0.05, "relu": 0.0, "drelu": 0.0, "fatrelu": 0.1}


def triton_device() -> str:
    """Where Triton tests put their tensors: CUDA when compiled, CPU under the interpreter."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype)
    assert torch.isfinite(out).all(), "non-finite output (an element was never written?)"
    scale = max(1.0, ref.float().abs().max().item())
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"max error {err} > {TOLERANCE[dtype]} * {scale}"


def assert_mask_equal(mask: torch.Tensor, ref: torch.Tensor) -> None:
    assert mask.dtype == torch.bool and mask.shape == ref.shape, (mask.dtype, mask.shape)
    assert mask.view(torch.uint8).max().item() <= 1, "mask holds poison (never written)"
    assert torch.equal(mask.cpu(), ref.cpu()), f"{(mask.cpu() != ref.cpu()).sum()} mismatches"


def predicted_mask(T: int, I: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """[T, I] bool with exactly round((1 - sparsity) * I) predicted neurons per row."""
    num_active = round((1.0 - sparsity) * I)
    mask = torch.zeros(T, I, dtype=torch.bool)
    for t in range(T):
        mask[t, torch.randperm(I, generator=gen)[:num_active]] = True
    return mask


def ffn_weights(T: int, H: int, I: int, dtype: torch.dtype, gen: torch.Generator,
                device: str = "cpu"):
    """Random x [T, H] and w_gate, w_up, w_down_t [I, H] with O(1) outputs."""
    x = torch.randn(T, H, generator=gen)
    ws = [torch.randn(I, H, generator=gen) / H ** 0.5 for _ in range(3)]
    return [t.to(dtype).to(device) for t in (x, *ws)]


def poison_allocations(monkeypatch, module) -> None:
    """Make `torch.empty`/`torch.empty_like` inside `module` return poisoned tensors.

    Floating tensors are NaN-filled and integer/bool tensors hold 7, so an element a kernel
    forgets to write shows up as a NaN or an invalid mask byte.
    """
    real = torch

    def _poison(t: torch.Tensor) -> torch.Tensor:
        if t.dtype.is_floating_point:
            return t.fill_(float("nan"))
        if t.dtype == torch.bool:
            t.view(torch.uint8).fill_(POISON_INT)
            return t
        return t.fill_(POISON_INT)

    proxy = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    proxy.empty = lambda *a, **kw: _poison(real.empty(*a, **kw))
    proxy.empty_like = lambda *a, **kw: _poison(real.empty_like(*a, **kw))
    monkeypatch.setattr(module, "torch", proxy)


def record_routes(monkeypatch, **routes) -> list[str]:
    """Wrap each route's function (label=(module, name)) so that a call appends its label to
    the returned list before running it: which path a dispatcher took."""
    calls: list[str] = []
    for label, (module, name) in routes.items():
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _real=real, _label=label, **k: calls.append(_label)
                            or _real(*a, **k))
    return calls
