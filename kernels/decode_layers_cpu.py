"""One native call for all decoder layers of a CPU decode step of an int8 model
(kernels/csrc/decode_layers_cpu.cpp): the launcher and the per-layer pointer table.

The caller (engine/models/fused_decode_cpu.py) decides when the step qualifies and builds the
LayerPointers from the model's modules; this module only checks shapes and dtypes and calls.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_serve.kernels import cpu_native

MAX_ROWS = 64   # the sparse FFN kernel's largest batch


class LayerPointers(ctypes.Structure):
    """Mirror of `struct Layer` in kernels/csrc/decode_layers_cpu.cpp (field order and types)."""
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "input_norm", "post_norm", "w_qkv", "s_qkv", "w_o", "s_o", "k_cache", "v_cache",
        "w_gate", "w_up", "w_down_t", "s_gate", "s_up", "s_down", "fc1", "fc2", "s_fc1", "s_fc2")] + [
        ("rank", ctypes.c_int64), ("act_threshold", ctypes.c_float), ("predictor_threshold", ctypes.c_float)]


@dataclass(frozen=True)
class Geometry:
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    eps: float
    attn_scale: float
    window: int            # 0: no sliding window
    act_code: int
    x_bits: int            # the activation grid of the int8 products (16 or 8)
    w_bits: int = 8        # q/k/v, o_proj and FFN weights: int8 (8) or 4-bit rows (4; kernels/int4_rows.py)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def layer_pointers(tensors: dict[str, Tensor | None], rank: int, act_threshold: float,
                   predictor_threshold: float) -> LayerPointers:
    """A LayerPointers from the named tensors (the fields above; None for an unused predictor).
    The caller keeps the tensors alive as long as the pointers are used."""
    for name, t in tensors.items():
        if t is not None:
            assert t.device.type == "cpu" and t.is_contiguous(), (name, t.device, t.stride())
    return LayerPointers(**{name: _ptr(t) for name, t in tensors.items()}, rank=rank,
                         act_threshold=act_threshold, predictor_threshold=predictor_threshold)


def available() -> bool:
    lib = cpu_native.load()
    return lib is not None and hasattr(lib, "decode_layers_cpu")


def decode_layers(x: Tensor, cos: Tensor, sin_signed: Tensor, slots: Tensor, block_tables: Tensor,
                  context_lens: Tensor, layers: ctypes.Array, geometry: Geometry,
                  max_blocks_per_seq: int) -> tuple[Tensor, Tensor]:
    """x [T, H] float32, updated in place through every layer. cos, sin_signed [T, D] float32;
    slots [T] int64; block_tables [T, >= max_blocks_per_seq] int32 (contiguous); context_lens [T]
    int32, each in [1, max_blocks_per_seq * block_size]. Returns (active_counts [L, T] int32,
    rows_read [L, 3] int64)."""
    T, H = x.shape
    g = geometry
    assert x.dtype == torch.float32 and x.is_contiguous() and 1 <= T <= MAX_ROWS and H == g.hidden, x.shape
    assert cos.shape == sin_signed.shape == (T, g.head_dim) and cos.dtype == torch.float32
    assert cos.is_contiguous() and sin_signed.is_contiguous()
    assert slots.dtype == torch.int64 and slots.shape == (T,) and slots.is_contiguous()
    assert block_tables.dtype == torch.int32 and block_tables.shape[0] == T and block_tables.is_contiguous()
    assert context_lens.dtype == torch.int32 and context_lens.shape == (T,) and context_lens.is_contiguous()
    num_layers = len(layers)
    active_counts = torch.empty(num_layers, T, dtype=torch.int32)
    rows_read = torch.empty(num_layers, 3, dtype=torch.int64)
    lib = cpu_native.load()
    rc = lib.decode_layers_cpu(
        x.data_ptr(), cos.data_ptr(), sin_signed.data_ptr(), slots.data_ptr(), block_tables.data_ptr(),
        context_lens.data_ptr(), ctypes.addressof(layers), num_layers, T, H, g.intermediate, g.num_heads,
        g.num_kv_heads, g.head_dim, g.block_size, block_tables.shape[1], g.eps, g.attn_scale, g.window,
        g.act_code, g.x_bits, g.w_bits, active_counts.data_ptr(), rows_read.data_ptr(),
        torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"decode_layers_cpu failed ({rc}: kernel {rc // 10}, code {rc % 10})")
    return active_counts, rows_read
