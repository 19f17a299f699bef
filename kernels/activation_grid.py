"""The activation grid of the int8 CPU kernels, in torch: each row of x is rounded to its own
grid before its dot products with int8 weight rows (kernels/csrc/int8_rows.h XRows is the
native twin), so the kernels sum exact integer products. 16 bits (`--quantization int8`): 14-bit
values, |xq| <= 8191; 8 bits (`--quantization w8a8`): |xq| <= 127.
The references (kernels/linear_int8_cpu.py, kernels/sparse_ffn_ref.py) apply it to define what
the kernels compute.
"""
from __future__ import annotations

import torch
from torch import Tensor

GRID_BITS = (16, 8)   # the grids the kernels have: 14-bit values in int16, or 8-bit


def x_max(k: int, bits: int = 16) -> int:
    """The activation grid's largest |xq| for rows of length k: 127 for 8 bits; for 16 bits 8191,
    less where k is so long (past ~17k) that a kernel's int32 lane could overflow (int8_rows.h
    x_max, the same rule)."""
    assert bits in GRID_BITS, bits
    if bits == 8:
        return 127
    per_lane = (k + 7) // 8
    return min(8191, (2147483647 // 127) // per_lane) if per_lane > 0 else 8191


@torch.no_grad()
def on_grid(x: Tensor, bits: int = 16) -> Tensor:
    """x [..., K] -> fp32, each row rounded to its own grid as the int8 kernels read it: step =
    amax / x_max(K, bits), values round(x / step) * step (ties to even); a zero row stays zero, a row
    with a NaN or an infinity becomes all NaN."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)
    qmax = float(x_max(x.shape[-1], bits))
    finite = torch.isfinite(amax)                 # a NaN anywhere makes amax NaN
    safe = torch.where(finite & (amax > 0), amax, torch.ones_like(amax))
    # NOTE: `qmax / tensor` would run as tensor.reciprocal() * qmax, an ulp off the kernel's division
    inv = torch.full_like(safe, qmax) / safe
    step = safe / qmax
    out = torch.round(x32 * inv) * step
    out = torch.where(amax > 0, out, torch.zeros_like(out))
    return torch.where(finite, out, torch.full_like(out, float("nan")))
