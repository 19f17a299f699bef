"""int8 weights on the CPU: `model.quantization: int8` (activations on a 14-bit grid) or `w8a8`
(8-bit activations: twice the products per instruction, for a measured quality cost;
docs/benchmarks/quantization.md). kernels/activation_grid.py defines the grids.
`int4` and `w4a8` are the same with 4-bit rows (kernels/int4_rows.py: groups of 32 weights with
an integer multiplier each, so every row is still an int8 row with the same scales, stored in
4.25 bits a weight) for q/k/v, o_proj and the FFN's gate, up and down; lm_head and the
predictors stay int8 under every method (see HEAD_WEIGHT_BITS).

After loading, `quantize_model` swaps attention's fused q/k/v weight, o_proj and lm_head for
int8 weights with one fp32 scale per output row (kernels/linear_int8_cpu.py), and each FFN's
gate, up and (transposed) down weights for int8 (gate and up with one fp32 scale per neuron,
down with one per output channel), which the native sparse FFN kernel reads row by row as
before (kernels/csrc/sparse_ffn_cpu.cpp): so sparsity and quantization multiply. The
predictors' fc1/fc2 become int8 with per-row scales (they cost under 0.01 points of recall:
docs/BENCHMARKS.md, bench/predictor_precision.py).
The method's activation grid applies to the inputs of q/k/v, o_proj and the FFN's gate and up
products. lm_head reads its input on the 14-bit grid under both methods: on SmolLM2 its 8-bit
grid alone cost +1.14% perplexity, more than the three others together (+0.98%), for ~2 ms of a
45 ms 16-row step (docs/benchmarks/quantization.md). The FFN's down products and the predictors
read fp32 activations. Norms, the
embedding and the KV cache keep the model dtype.

Parameter counts do not change: each int8 weight is a non-grad Parameter named `weight` of the
same shape, so CausalLM.num_params and the activated-params accounting stay as they were.
A tied head (lm_head shares the embedding) gets its own int8 copy: the embedding keeps the
model dtype for its row lookups, and the copy adds 1 byte per weight (a quarter of an fp32
embedding, half of a bf16 one) while the head, the largest single matrix of a small model,
reads 4x fewer bytes per token. That copy is a buffer, not a Parameter, so the tied weight
is still counted once.
"""
from __future__ import annotations

import torch
from torch import nn

from sparse_serve.engine.models.attention import Attention
from sparse_serve.engine.models.ffn import Predictor, SparseMLP
from sparse_serve.kernels.int4_rows import keep_logical_shape, quantize_int4
from sparse_serve.kernels.linear_int8_cpu import linear_int8, quantize_int8

# method -> the activation grid (bits) of its quantized products
ACTIVATION_BITS = {"int8": 16, "w8a8": 8, "int4": 16, "w4a8": 8}
# method -> the weight bits of q/k/v, o_proj and the FFN
WEIGHT_BITS = {"int8": 8, "w8a8": 8, "int4": 4, "w4a8": 4}
HEAD_ACTIVATION_BITS = 16   # lm_head's, under every method (see the top of the file)
HEAD_WEIGHT_BITS = 8        # lm_head's, under every method
QUANTIZATION_METHODS = tuple(ACTIVATION_BITS)


def quantize_rows(w: torch.Tensor, w_bits: int, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (int8 [N, K] or 4-bit rows uint8 [N, row_bytes(K)], fp32 scales): one
    scale per row (dim 0) or per column (dim 1)."""
    if w_bits == 4:
        return quantize_int4(w, dim)
    if dim == 1:
        w_q, scale = quantize_int8(w.t())
        return w_q.t().contiguous(), scale
    return quantize_int8(w)


class QuantizedLinear(nn.Module):
    """y = on_grid(x, x_bits) @ (weight * scale[:, None]).T with weight int8 [N, K] (or 4-bit rows
    uint8 [N, row_bytes(K)] of the same int8 values), scale float32 [N]; y in x's dtype."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, counted: bool = True, x_bits: int = 16,
                 in_features: int | None = None):
        super().__init__()
        assert weight.dtype in (torch.int8, torch.uint8) and weight.dim() == 2, (weight.dtype, weight.shape)
        assert scale.dtype == torch.float32 and scale.shape == weight.shape[:1], (scale.dtype, scale.shape)
        self.out_features = weight.shape[0]
        self.in_features = weight.shape[1] if in_features is None else in_features
        self.w_bits = 4 if weight.dtype == torch.uint8 else 8
        if counted:
            self.weight = nn.Parameter(weight, requires_grad=False)
        else:   # a copy of a weight counted elsewhere (the tied head)
            self.register_buffer("weight", weight)
        if self.w_bits == 4:
            keep_logical_shape(self.weight, (self.out_features, self.in_features))
        self.register_buffer("scale", scale)
        self.x_bits = x_bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, counted: bool = True, x_bits: int = 16,
                    w_bits: int = 8) -> QuantizedLinear:
        if linear.bias is not None:
            raise ValueError("int8 quantization supports linears without bias only")
        return cls(*quantize_rows(linear.weight, w_bits), counted=counted, x_bits=x_bits,
                   in_features=linear.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_int8(x, self.weight, self.scale, self.x_bits)

    def extra_repr(self) -> str:
        weights = "int8" if self.w_bits == 8 else "4-bit rows (int8 values)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {weights}, per-row scales, "
                f"{self.x_bits}-bit activation grid")


@torch.no_grad()
def quantize_attention(attn: Attention, x_bits: int = 16, w_bits: int = 8) -> None:
    """The fused [q; k; v] weight and o_proj to int8 (or 4-bit rows). q/k/v_proj become views of
    the fused quantized weight (their HF names and counts stay), so no floating copy stays alive."""
    attn.fuse_qkv()
    hidden = attn.w_qkv.shape[1]
    w_q, scale = quantize_rows(attn.w_qkv, w_bits)                         # [Nq+2Nkv, H or bytes], [Nq+2Nkv]
    start = 0
    for name in ("q_proj", "k_proj", "v_proj"):
        rows = getattr(attn, name).weight.shape[0]
        setattr(attn, name, QuantizedLinear(w_q[start:start + rows], scale[start:start + rows], x_bits=x_bits,
                                            in_features=hidden))
        start += rows
    attn.w_qkv, attn.w_qkv_scale, attn.w_qkv_x_bits = w_q, scale, x_bits
    attn.o_proj = QuantizedLinear.from_linear(attn.o_proj, x_bits=x_bits, w_bits=w_bits)


def _rows_in_place(linear: nn.Linear, w_bits: int = 8) -> torch.Tensor:
    """linear.weight becomes its int8 rows or 4-bit rows (a non-grad Parameter of the same name,
    counted as the weight's shape: keep_logical_shape); returns the per-row fp32 scales for the
    caller to keep."""
    shape = tuple(linear.weight.shape)
    w_q, scale = quantize_rows(linear.weight, w_bits)
    linear.weight = nn.Parameter(w_q, requires_grad=False)
    if w_bits == 4:
        keep_logical_shape(linear.weight, shape)
    return scale


@torch.no_grad()
def quantize_mlp(mlp: SparseMLP, x_bits: int = 16, w_bits: int = 8) -> None:
    """gate_proj, up_proj and w_down_t (one row per neuron each) to int8 or 4-bit rows: gate and
    up with a scale per row (neuron), w_down_t with one per column (down_proj's output channel)
    for int8 and one per row (neuron) for 4-bit rows (why: kernels/sparse_ffn_ref.py RowScales).
    The quantized gate/up weights replace the
    Parameters (same names, counted as the weights' shapes, so the parameter counts and the
    activity accounting stay as they were; 1 byte, or 4.25 bits, per weight read)."""
    assert mlp.w_down_t is not None, "quantize after prepare_for_inference()"
    mlp.gate_scale = _rows_in_place(mlp.gate_proj, w_bits)
    mlp.up_scale = _rows_in_place(mlp.up_proj, w_bits)
    shape = tuple(mlp.w_down_t.shape)
    # [I, H], [H] (int8) or [I, bytes], [I] (4-bit rows)
    mlp.w_down_t, mlp.down_scale = quantize_rows(mlp.w_down_t, w_bits, dim=0 if w_bits == 4 else 1)
    if w_bits == 4:
        keep_logical_shape(mlp.w_down_t, shape)
    mlp.x_bits = x_bits


@torch.no_grad()
def quantize_predictor(predictor: Predictor) -> None:
    """fc1 and fc2 to int8 rows with per-row scales (same Parameter names and shapes)."""
    predictor.fc1_scale = _rows_in_place(predictor.fc1)
    predictor.fc2_scale = _rows_in_place(predictor.fc2)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str) -> None:
    """Quantize a loaded CausalLM (engine/models/llama.py) in place."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {method!r} (choices: {', '.join(QUANTIZATION_METHODS)})")
    device = model.lm_head.weight.device
    if device.type != "cpu":
        raise ValueError(f"--quantization {method} runs on the CPU only for now; the model is on {device} "
                         "(serve it without --quantization, or with --device cpu)")
    x_bits, w_bits = ACTIVATION_BITS[method], WEIGHT_BITS[method]
    for layer in model.model.layers:
        quantize_attention(layer.self_attn, x_bits, w_bits)
    for mlp in model.mlps:
        quantize_mlp(mlp, x_bits, w_bits)
        if mlp.predictor is not None:
            quantize_predictor(mlp.predictor)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    model.lm_head = QuantizedLinear.from_linear(model.lm_head, counted=not tied, x_bits=HEAD_ACTIVATION_BITS,
                                                w_bits=HEAD_WEIGHT_BITS)
