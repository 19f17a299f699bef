"""The FFN activations every path implements, named once (no torch: the config imports it).

silu: h = silu(g) * u, zeroed where |silu(g)| <= threshold (calibrated SwiGLU); relu and fatrelu
(ReLU with a threshold): h = act(g) * u; drelu (TurboSparse): h = relu(g) * relu(u).
kernels/sparse_ffn_ref.py defines their semantics; the compiled kernels take the codes.
"""
from __future__ import annotations

ACTIVATIONS = ("silu", "relu", "drelu", "fatrelu")
# The codes the compiled kernels take (Triton's ACT constexpr, the C++ kernel's enum Act).
ACT_CODES = {act: code for code, act in enumerate(ACTIVATIONS)}


def check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown FFN activation {act!r}; expected one of {ACTIVATIONS}")
