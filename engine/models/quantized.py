"""int8 weights on the CPU: `model.quantization: int8` (activations on a 14-bit grid) or `w8a8`
(8-bit activations: twice the products per instruction, for a measured quality cost;
docs/benchmarks/quantization.md). kernels/activation_grid.py defines the grids.

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
from sparse_serve.kernels.linear_int8_cpu import linear_int8, quantize_int8

# method -> the activation grid (bits) of its int8 products
ACTIVATION_BITS = {"int8": 16, "w8a8": 8}
HEAD_ACTIVATION_BITS = 16   # lm_head's, under either method (see the top of the file)
QUANTIZATION_METHODS = tuple(ACTIVATION_BITS)


class QuantizedLinear(nn.Module):
    """y = on_grid(x, x_bits) @ (weight * scale[:, None]).T with weight int8 [N, K], scale float32
    [N]; y in x's dtype."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, counted: bool = True, x_bits: int = 16):
        super().__init__()
        assert weight.dtype == torch.int8 and weight.dim() == 2, (weight.dtype, weight.shape)
        assert scale.dtype == torch.float32 and scale.shape == weight.shape[:1], (scale.dtype, scale.shape)
        self.out_features, self.in_features = weight.shape
        if counted:
            self.weight = nn.Parameter(weight, requires_grad=False)
        else:   # a copy of a weight counted elsewhere (the tied head)
            self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.x_bits = x_bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, counted: bool = True, x_bits: int = 16) -> QuantizedLinear:
        if linear.bias is not None:
            raise ValueError("int8 quantization supports linears without bias only")
        return cls(*quantize_int8(linear.weight), counted=counted, x_bits=x_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_int8(x, self.weight, self.scale, self.x_bits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales, "
                f"{self.x_bits}-bit activation grid")


@torch.no_grad()
def quantize_attention(attn: Attention, x_bits: int = 16) -> None:
    """The fused [q; k; v] weight and o_proj to int8. q/k/v_proj become int8 views of the fused
    int8 weight (their HF names and counts stay), so no floating copy stays alive."""
    attn.fuse_qkv()
    w_q, scale = quantize_int8(attn.w_qkv)                                 # [Nq+2Nkv, H], [Nq+2Nkv]
    start = 0
    for name in ("q_proj", "k_proj", "v_proj"):
        rows = getattr(attn, name).weight.shape[0]
        setattr(attn, name, QuantizedLinear(w_q[start:start + rows], scale[start:start + rows], x_bits=x_bits))
        start += rows
    attn.w_qkv, attn.w_qkv_scale, attn.w_qkv_x_bits = w_q, scale, x_bits
    attn.o_proj = QuantizedLinear.from_linear(attn.o_proj, x_bits=x_bits)


def _int8_rows_in_place(linear: nn.Linear) -> torch.Tensor:
    """linear.weight becomes its int8 rows (a non-grad Parameter of the same name and shape, so
    parameter counts stay as they were); returns the per-row fp32 scales for the caller to keep."""
    w_q, scale = quantize_int8(linear.weight)
    linear.weight = nn.Parameter(w_q, requires_grad=False)
    return scale


@torch.no_grad()
def quantize_mlp(mlp: SparseMLP, x_bits: int = 16) -> None:
    """gate_proj, up_proj and w_down_t (one row per neuron each) to int8: gate and up with a scale
    per row (neuron), w_down_t with one per column (down_proj's output channel; why:
    kernels/sparse_ffn_ref.py RowScales). The int8 gate/up weights replace the Parameters (same
    names and shapes, so the parameter counts and the activity accounting stay as they were;
    1 byte per weight read)."""
    assert mlp.w_down_t is not None, "quantize after prepare_for_inference()"
    mlp.gate_scale = _int8_rows_in_place(mlp.gate_proj)
    mlp.up_scale = _int8_rows_in_place(mlp.up_proj)
    down_q, mlp.down_scale = quantize_int8(mlp.w_down_t.t())             # [H, I], [H]
    mlp.w_down_t = down_q.t().contiguous()                                # [I, H]
    mlp.x_bits = x_bits


@torch.no_grad()
def quantize_predictor(predictor: Predictor) -> None:
    """fc1 and fc2 to int8 rows with per-row scales (same Parameter names and shapes)."""
    predictor.fc1_scale = _int8_rows_in_place(predictor.fc1)
    predictor.fc2_scale = _int8_rows_in_place(predictor.fc2)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str) -> None:
    """Quantize a loaded CausalLM (engine/models/llama.py) in place."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {method!r} (choices: {', '.join(QUANTIZATION_METHODS)})")
    device = model.lm_head.weight.device
    if device.type != "cpu":
        raise ValueError(f"--quantization {method} runs on the CPU only for now; the model is on {device} "
                         "(serve it without --quantization, or with --device cpu)")
    x_bits = ACTIVATION_BITS[method]
    for layer in model.model.layers:
        quantize_attention(layer.self_attn, x_bits)
    for mlp in model.mlps:
        quantize_mlp(mlp, x_bits)
        if mlp.predictor is not None:
            quantize_predictor(mlp.predictor)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    model.lm_head = QuantizedLinear.from_linear(model.lm_head, counted=not tied, x_bits=HEAD_ACTIVATION_BITS)
