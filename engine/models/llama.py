"""Llama / Mistral / Bamboo (TurboSparse) decoder in plain eager PyTorch.

Parameter names follow the HF checkpoints (`model.layers.{i}.self_attn.q_proj.weight`, ...), so
the loader copies tensors by name. `forward` takes a flat batch of tokens (all sequences
concatenated) and returns hidden states plus per-layer FFN activity; `compute_logits` maps the
hidden states the runner selects onto the vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn

from sparse_serve.engine.models.arch_config import ModelArchConfig
from sparse_serve.engine.models.attention import Attention, AttentionMetadata
from sparse_serve.engine.models.ffn import FFNActivity, SparseMLP
from sparse_serve.engine.models.fused_decode_cpu import FusedDecode
from sparse_serve.engine.models.layers import RMSNorm, RotaryEmbedding
from sparse_serve.kernels.int4_rows import logical_numel


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, rope: RotaryEmbedding, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   rope, cfg.sliding_window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.ffn_act, cfg.act_threshold,
                             cfg.predictor_rank_of(layer))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        # NOTE: the predictor reads the residual stream *before* the post-attention norm.
        ffn_out, activity = self.mlp(self.post_attention_layernorm(x), x)
        return x + ffn_out, activity


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings,
                               cfg.rope_scaling_factor)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # CPU decode steps of an int8 model through one native call (engine/models/fused_decode_cpu.py);
        # False: always layer by layer (tests compare the two)
        self.fused_cpu_decode = True
        self._fused = FusedDecode(self)

    @property
    def mlps(self) -> list[SparseMLP]:
        return [layer.mlp for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, list[FFNActivity]]:
        """input_ids, positions: [T] -> (hidden [T, H], one FFNActivity per layer)."""
        x = self.model.embed_tokens(input_ids)                                  # [T, H]
        if meta.real_rows is not None:   # padding rows stay exactly zero through every layer
            x = x * meta.real_rows
        if self.fused_cpu_decode:
            activities = self._fused.run(x, positions, meta)
            if activities is not None:
                return self.model.norm(x), activities
        activities = []
        for layer in self.model.layers:
            x, activity = layer(x, positions, meta)
            activities.append(activity)
        return self.model.norm(x), activities

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()                                     # [N, V]

    def num_params(self) -> int:
        """Model parameters a token can use: predictors are excluded (they are overhead, not
        model capacity) and a tied head is counted once."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if ".predictor." in name or id(p) in seen:
                continue
            seen.add(id(p))
            total += logical_numel(p)
        for mlp in self.mlps:   # after prepare_for_inference down_proj lives in w_down_t
            if mlp.w_down_t is not None:
                total += logical_numel(mlp.w_down_t)
        return total
