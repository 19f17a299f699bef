"""Decode steps of an int8 model on the CPU through one native call for all layers
(kernels/decode_layers_cpu.py), instead of ~25 Python-level ops per layer.

`FusedDecode.run` is what CausalLM.forward calls; it returns None where the step does not
qualify, and the model then runs its layers one by one as before. A step qualifies when it is
decode-only on the CPU in float32, every layer is int8 or 4-bit rows (`model.quantization:
int8`, `w8a8`, `int4` or `w4a8`: one activation grid and one weight format for all) with an
fp32 paged KV cache, the FFN takes its sparse kernel (no forced dense fallback, no shadow check
this step), and the layers share one norm epsilon, sliding window and activation (thresholds
may differ per layer). The per-layer counts (active neurons per token, rows read, predictor
weights read) are the ones the layer-by-layer path reports: the same kernels count them.
"""
from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from sparse_serve.engine.models.attention import AttentionMetadata
from sparse_serve.engine.models.ffn import FFNActivity
from sparse_serve.kernels import decode_layers_cpu
from sparse_serve.kernels.activations import ACT_CODES
from sparse_serve.kernels.int4_rows import is_packed

logger = logging.getLogger(__name__)


class FusedDecode:
    """The pointer table of one model's layers. The conditions are checked, and the table
    rebuilt, only when the step's state key changes: the KV cache, the weights' memory (the model
    runner packs them onto huge pages, again for each engine built on the model), a threshold or
    a switch (the runner flips shadow checks per step)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._key: tuple | None = None
        self._ok = False
        self._layers: ctypes.Array | None = None
        self._predictor_reads: list[int] = []
        # NOTE: the table's tensors, held so that no allocation can reuse their addresses while
        # the key (which compares addresses) still names them.
        self._tensors: list[torch.Tensor] = []
        self._geometry: decode_layers_cpu.Geometry | None = None

    def _state_key(self) -> tuple:
        """What the conditions and the table depend on, per layer (cheap: read every step)."""
        return tuple((None if layer.self_attn.kv_cache is None else layer.self_attn.kv_cache[0].data_ptr(),
                      None if layer.self_attn.w_qkv is None else layer.self_attn.w_qkv.data_ptr(),
                      layer.mlp.gate_proj.weight.data_ptr(), layer.mlp.use_predictor, layer.mlp.act_threshold,
                      layer.mlp.predictor_threshold, layer.mlp.use_sparse_kernels, layer.mlp.shadow_check,
                      layer.mlp.dense_fallback_fraction) for layer in self.model.model.layers)

    def _static_ok(self) -> bool:
        """The model side of the conditions (see the module docstring)."""
        layers = self.model.model.layers
        first = layers[0]
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.w_qkv_scale is None or getattr(attn.o_proj, "scale", None) is None:
                return False
            if attn.kv_cache is None or attn.kv_cache[0].dtype != torch.float32:
                return False
            if mlp.row_scales is None or not mlp.use_sparse_kernels or mlp.shadow_check:
                return False
            if mlp.dense_fallback_fraction is not None and mlp.dense_fallback_fraction < 1.0:
                return False
            if mlp.use_predictor and mlp.predictor is not None and mlp.predictor.fc1_scale is None:
                return False
            if not attn.w_qkv_x_bits == attn.o_proj.x_bits == mlp.x_bits == first.mlp.x_bits:
                return False
            formats = {attn.w_qkv.dtype, attn.o_proj.weight.dtype, mlp.gate_proj.weight.dtype, mlp.w_down_t.dtype}
            if formats != {first.mlp.gate_proj.weight.dtype}:
                return False
            if (attn.sliding_window != first.self_attn.sliding_window or mlp.act != first.mlp.act
                    or layer.input_layernorm.eps != first.input_layernorm.eps
                    or layer.post_attention_layernorm.eps != first.input_layernorm.eps):
                return False
        return decode_layers_cpu.available()

    def _build(self) -> None:
        layers = self.model.model.layers
        table = (decode_layers_cpu.LayerPointers * len(layers))()
        held: list[torch.Tensor] = []
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            predictor = mlp.predictor if mlp.use_predictor else None
            k_cache, v_cache = attn.kv_cache
            tensors = dict(
                input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
                w_qkv=attn.w_qkv, s_qkv=attn.w_qkv_scale, w_o=attn.o_proj.weight, s_o=attn.o_proj.scale,
                k_cache=k_cache, v_cache=v_cache, w_gate=mlp.gate_proj.weight, w_up=mlp.up_proj.weight,
                w_down_t=mlp.w_down_t, s_gate=mlp.gate_scale, s_up=mlp.up_scale, s_down=mlp.down_scale,
                fc1=None if predictor is None else predictor.fc1.weight,
                fc2=None if predictor is None else predictor.fc2.weight,
                s_fc1=None if predictor is None else predictor.fc1_scale,
                s_fc2=None if predictor is None else predictor.fc2_scale)
            held.extend(t for t in tensors.values() if t is not None)
            rank = 0 if predictor is None else predictor.fc1.weight.shape[0]
            table[i] = decode_layers_cpu.layer_pointers(tensors, rank=rank, act_threshold=mlp.act_threshold,
                                                        predictor_threshold=mlp.predictor_threshold)
        first, cfg = layers[0], self.model.config
        self._geometry = decode_layers_cpu.Geometry(
            hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, num_heads=first.self_attn.num_heads,
            num_kv_heads=first.self_attn.num_kv_heads, head_dim=first.self_attn.head_dim,
            block_size=first.self_attn.kv_cache[0].shape[1], eps=first.input_layernorm.eps,
            attn_scale=first.self_attn.scale, window=first.self_attn.sliding_window or 0,
            act_code=ACT_CODES[first.mlp.act], x_bits=first.mlp.x_bits,
            w_bits=4 if is_packed(first.mlp.gate_proj.weight) else 8)
        if self._layers is None:
            logger.info("%s decode steps on the CPU: one native call for all %d layers",
                        "4-bit" if self._geometry.w_bits == 4 else "int8", len(layers))
        self._predictor_reads = [mlp.predictor.num_params if mlp.predictor is not None and mlp.use_predictor
                                 else 0 for mlp in (layer.mlp for layer in layers)]
        self._layers, self._tensors = table, held

    def run(self, x: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> list[FFNActivity] | None:
        """x [T, H]: the embeddings, updated in place to the last layer's output. None (x
        untouched) when the step does not qualify."""
        num_rows = x.shape[0]
        if (x.device.type != "cpu" or x.dtype != torch.float32 or not meta.is_decode_only
                or meta.real_rows is not None or meta.slot_mapping is None
                or not 1 <= num_rows <= decode_layers_cpu.MAX_ROWS):
            return None
        key = self._state_key()
        if key != self._key:
            self._ok = self._static_ok()
            if self._ok:
                self._build()
            self._key = key
        if not self._ok:
            return None
        first = self.model.model.layers[0].self_attn
        cos, sin = meta.rope_tables(first.rope, positions)                      # [T, 1, D] each
        lens = meta.seq_lens_tensor
        max_blocks = meta.block_tables.shape[1]
        # NOTE: the kernel trusts these bounds (raw pointers); one check per step, not per layer.
        assert int(lens.min()) >= 1 and int(lens.max()) <= max_blocks * self._geometry.block_size, \
            "context lengths out of the block table's range"
        counts, rows_read = decode_layers_cpu.decode_layers(
            x, cos.reshape(num_rows, -1).contiguous(), sin.reshape(num_rows, -1).contiguous(),
            meta.slot_mapping.contiguous(), meta.block_tables.contiguous(), lens.contiguous(), self._layers,
            self._geometry, max_blocks)
        return [FFNActivity(active_counts=counts[i], rows_read=rows_read[i], predictor_params_read=reads)
                for i, reads in enumerate(self._predictor_reads)]
