"""4-bit weight rows (`--quantization int4` / `w4a8`): the torch twin of kernels/csrc/int4_rows.h.

A weight row of K values is cut into groups of 32 along K. Each group keeps an integer
multiplier m (1..16) and one 4-bit code c per weight, standing for the int8 value m * (c - 8)
with |c - 8| <= 7: so every 4-bit row IS an int8 row (values in [-112, 112]) with the same fp32
scales as the int8 format, and the int8 kernels, references and accounting apply to it
unchanged once a row is decoded. Stored as uint8 [N, G * 17] (G = ceil(K / 32) groups): the G
groups' codes, 16 bytes each (byte j: weight j in the low nibble, weight j + 16 in the high one),
then the G multipliers; the last group is padded with value-0 codes. 4.25 bits per weight.
A uint8 weight tensor means this format everywhere (kernels/linear_int8_cpu.py, sparse_ffn*.py).

NOTE: an integer multiplier per group, not an fp32 scale per group (llama.cpp's Q4_0), so that the
kernels' sums stay exact integer sums: a group's values are one 16-entry table lookup away
(vpshufb). The multiplier is chosen per group to minimise the group's squared error against the
int8-grid values (a few candidates below the one that never clips).
"""
from __future__ import annotations

import torch
from torch import Tensor

GROUP = 32
GROUP_BYTES = 17
MAX_CODE = 7          # |c - 8| <= 7
MAX_MULTIPLIER = 16
MAX_VALUE = MAX_CODE * MAX_MULTIPLIER   # 112: the int8 values' range
_CANDIDATES = 4       # multipliers tried per group: the non-clipping one and the 3 below it
_ROWS_PER_CHUNK = 4096


def keep_logical_shape(packed: Tensor, shape: tuple[int, int]) -> Tensor:
    """Marks a 4-bit weight with the shape of the weight it stores: parameter counts
    (CausalLM.num_params) count those weights, not the packed bytes (logical_numel)."""
    packed.logical_shape = tuple(shape)
    return packed


def logical_numel(t: Tensor) -> int:
    """Weights a tensor stores: its numel, or for 4-bit rows the stored weight's."""
    shape = getattr(t, "logical_shape", None)
    return t.numel() if shape is None else shape[0] * shape[1]


def num_groups(k: int) -> int:
    return -(-k // GROUP)


def row_bytes(k: int) -> int:
    """Bytes of one packed row of k weights."""
    return num_groups(k) * GROUP_BYTES


def is_packed(w: Tensor) -> bool:
    """Whether a weight tensor holds 4-bit rows (the format's dtype is uint8)."""
    return w.dtype == torch.uint8


def stored_width(w: Tensor, k: int) -> int:
    """A row's stored width for rows of k weights: row_bytes(k) for 4-bit rows, else k."""
    return row_bytes(k) if is_packed(w) else k


@torch.no_grad()
def _pack_chunk(v: Tensor) -> Tensor:
    """v [n, G * 32] float32, |v| <= MAX_VALUE -> packed uint8 [n, G * 17]."""
    n, kp = v.shape
    g = v.view(n, kp // GROUP, GROUP)                                     # [n, G, 32]
    top = torch.ceil(g.abs().amax(dim=-1) / MAX_CODE).clamp_(1, MAX_MULTIPLIER)   # [n, G]: never clips
    best_err = best_m = None
    q = torch.empty_like(g)
    for step in range(_CANDIDATES):
        m = (top - step).clamp_(min=1)                                    # [n, G]
        # NOTE: in place, one [n, G, 32] buffer: a 7B model's matrices go through here at load
        torch.mul(g, m.reciprocal()[..., None], out=q).round_().clamp_(-MAX_CODE, MAX_CODE)
        err = q.mul_(m[..., None]).sub_(g).square_().sum(dim=-1)           # [n, G]
        if best_err is None:
            best_err, best_m = err, m
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_m = torch.where(better, m, best_m)
    codes = torch.mul(g, best_m.reciprocal()[..., None], out=q).round_().clamp_(-MAX_CODE, MAX_CODE)
    codes = (codes + 8).to(torch.uint8)                                   # [n, G, 32]
    nibbles = codes[..., :16] | (codes[..., 16:] << 4)                    # [n, G, 16]
    return torch.cat([nibbles.reshape(n, -1), best_m.to(torch.uint8)], dim=1)


@torch.no_grad()
def pack_int4(v: Tensor) -> Tensor:
    """v [N, K] float, values on the int8 scale with |v| <= MAX_VALUE (the weight over its fp32
    scales) -> packed uint8 [N, row_bytes(K)]."""
    assert v.dim() == 2, v.shape
    n, k = v.shape
    kp = num_groups(k) * GROUP
    out = torch.empty(n, row_bytes(k), dtype=torch.uint8)
    for start in range(0, n, _ROWS_PER_CHUNK):   # bounded temporaries for 7B-sized matrices
        chunk = v[start:start + _ROWS_PER_CHUNK].float()
        if kp != k:
            chunk = torch.nn.functional.pad(chunk, (0, kp - k))
        out[start:start + _ROWS_PER_CHUNK] = _pack_chunk(chunk)
    return out


@torch.no_grad()
def unpack_int4(packed: Tensor, k: int) -> Tensor:
    """packed uint8 [N, row_bytes(k)] -> the int8 values [N, k] (what the kernels decode)."""
    n = packed.shape[0]
    groups = num_groups(k)
    assert packed.dtype == torch.uint8 and packed.shape == (n, row_bytes(k)), (packed.dtype, packed.shape, k)
    nibbles = packed[:, :groups * 16].reshape(n, groups, 16)
    codes = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).to(torch.int16) - 8     # [N, G, 32]
    m = packed[:, groups * 16:].to(torch.int16).clamp_(max=MAX_MULTIPLIER)           # [N, G]
    return (codes * m[..., None]).reshape(n, groups * GROUP)[:, :k].to(torch.int8)


def int8_values(w: Tensor, k: int) -> Tensor:
    """The int8 values [N, k] of an int8 weight (itself) or of 4-bit rows (decoded)."""
    return unpack_int4(w, k) if is_packed(w) else w


@torch.no_grad()
def quantize_int4(w: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """w [N, K] float -> (packed uint8 [N, row_bytes(K)], scale float32), groups along K.
    dim 0: one scale per row [N] (what quantize_model uses: a linear's output rows, the FFN's
    neurons' gate, up and down rows); dim 1: one per column [K]. An all-zero row or column gets
    scale 1."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1 - dim)
    scale = torch.where(amax > 0, amax / MAX_VALUE, torch.ones_like(amax)).contiguous()
    v = w32 / (scale[:, None] if dim == 0 else scale[None, :])
    return pack_int4(v), scale
