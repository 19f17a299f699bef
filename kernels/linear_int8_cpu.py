"""int8 linear on the CPU: the native kernel (kernels/csrc/linear_int8_cpu.cpp), its torch
reference, and the per-row quantizers both read.

A weight W [N, K] is stored as int8 w_q [N, K] and one fp32 scale per output row (symmetric, per
channel): W ~= w_q * scale[:, None], |w_q| <= 127. Each activation row is put on its own 14-bit
grid (kernels/activation_grid.py: x ~= xq * step, |xq| <= 8191) and the kernel sums exact integer products, so
the weight bytes shrink 4x against fp32 and a batched step does twice fp32's products per
instruction (AVX-512 VNNI), for a perplexity change under 0.02% (docs/benchmarks/quantization.md).
A uint8 w_q holds 4-bit rows instead (kernels/int4_rows.py): the same int8 values and scales at
4.25 bits per weight, decoded by the kernel a tile at a time.
NOTE: our own kernel because torch's CPU `aten._weight_int8pack_mm` measured 10-100x slower than
fp32 F.linear on this AVX-512 host (docs/benchmarks/quantization.md).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_serve.kernels import cpu_native
from sparse_serve.kernels.activation_grid import on_grid
from sparse_serve.kernels.int4_rows import int8_values, is_packed, stored_width

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


@torch.no_grad()
def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] float -> (w_q int8 [N, K] contiguous, scale float32 [N]), symmetric per row.
    An all-zero row gets scale 1 (its int8 row is zero either way)."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1)                                          # [N]
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))    # [N]
    w_q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return w_q, scale.contiguous()


def linear_int8_ref(x: Tensor, w_q: Tensor, scale: Tensor, x_bits: int = 16) -> Tensor:
    """The definition: x on its x_bits grid and w dequantised, then an fp32 matmul.
    x [..., K] -> [..., N] in x.dtype."""
    w = int8_values(w_q, x.shape[-1]).float() * scale[:, None]            # [N, K]
    return F.linear(on_grid(x, x_bits), w).to(x.dtype)


def native_supported(x: Tensor) -> bool:
    """A CPU activation of a dtype the kernel reads, and a library that built."""
    return x.device.type == "cpu" and x.dtype in _DTYPE_CODES and cpu_native.available()


def linear_int8_native(x: Tensor, w_q: Tensor, scale: Tensor, out: Tensor | None = None,
                       x_bits: int = 16) -> Tensor:
    """x [M, K] float32/bfloat16 (any M >= 0), put on its x_bits grid (16 or 8); w_q int8 [N, K]
    or 4-bit rows uint8 [N, row_bytes(K)], contiguous; scale float32 [N].
    Returns [M, N] in x.dtype, written into `out` when given. Reads w_q once per 64 rows of x."""
    M, K = x.shape
    N = w_q.shape[0]
    assert x.device.type == "cpu" and x.dtype in _DTYPE_CODES, (x.device, x.dtype)
    w_bits = 4 if is_packed(w_q) else 8
    assert w_q.dtype in (torch.int8, torch.uint8) and w_q.shape == (N, stored_width(w_q, K)) and w_q.is_contiguous(), (
        w_q.dtype, w_q.shape)
    assert scale.dtype == torch.float32 and scale.shape == (N,) and scale.is_contiguous(), (scale.dtype, scale.shape)
    x = x.contiguous()
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype)
    assert out.shape == (M, N) and out.dtype == x.dtype and out.is_contiguous(), (out.shape, out.dtype)
    if M == 0:
        return out
    lib = cpu_native.load()
    rc = lib.linear_int8_cpu(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(w_q.data_ptr()),
                             ctypes.c_void_p(scale.data_ptr()), ctypes.c_void_p(out.data_ptr()), M, K, N,
                             _DTYPE_CODES[x.dtype], x_bits, w_bits, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"linear_int8_cpu failed ({rc})")
    return out


def linear_int8(x: Tensor, w_q: Tensor, scale: Tensor, x_bits: int = 16) -> Tensor:
    """x [..., K] @ (w_q * scale).T -> [..., N] in x.dtype: the native kernel where it runs,
    else the reference (correct, slower: it dequantises the whole weight per call)."""
    if not native_supported(x):
        return linear_int8_ref(x, w_q, scale, x_bits)
    lead = x.shape[:-1]
    out = linear_int8_native(x.reshape(-1, x.shape[-1]), w_q, scale, x_bits=x_bits)
    return out.view(*lead, w_q.shape[0])
