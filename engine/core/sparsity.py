"""The one place that turns neuron and row counts into params, bytes and sparsity.

Three quantities, each defined once here (formulas and examples: docs/SPARSITY.md):
- activated params, per token: parameters whose contribution was non-zero. Neuron i is active
  for a token iff h_i != 0 after the activation (and predicted active when a predictor is
  used); an inactive neuron saves its gate row, up row and down column, 3 * hidden parameters:
      activated = total_params - inactive * 3 * hidden
- computed params, per step: parameters the step read. The FFN kernel path that ran reports its
  gate, up and down rows read (`hidden` parameters each); the predictors' weights count when
  they ran; everything outside the FFNs counts whole, as in total_params:
      computed = total_params - ffn_params + rows_read * hidden + predictor_params_read
- read bytes, per step: the same reads in bytes of the weights as stored (the FFN's and the
  predictors' dtype; outside the FFNs each weight at its own, e.g. int8 linears; the scales of
  int8 weights, the FFNs' included, count whole every step):
      read_bytes = non_ffn_bytes + rows_read * hidden * ffn_weight_bytes
                   + predictor_params_read * predictor_weight_bytes
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_serve.kernels.int4_rows import logical_numel


def _bytes_per_weight(w) -> float:
    """Stored bytes per weight: the element size, or for 4-bit rows (kernels/int4_rows.py) the
    packed bytes over the weights they hold (17/32 where rows are whole groups)."""
    return w.element_size() if w.dtype != torch.uint8 else w.nbytes / logical_numel(w)


@dataclass(frozen=True)
class SparsityAccounting:
    total_params: int              # model parameters, predictors excluded (CausalLM.num_params)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    predictor_params: int = 0      # all layers' predictor weights, when they are used
    non_ffn_bytes: int = 0         # bytes of the weights outside the FFNs (total_params' rest)
    ffn_weight_bytes: float = 0    # bytes of one FFN weight (17/32 for 4-bit rows)
    predictor_weight_bytes: int = 0

    @classmethod
    def of_model(cls, model) -> SparsityAccounting:
        """The accounting of a loaded CausalLM (engine/models/llama.py)."""
        cfg = model.config
        mlps = model.mlps
        predictors = [mlp.predictor for mlp in mlps if mlp.predictor is not None]
        skip = {id(p) for predictor in predictors for p in predictor.parameters()}
        for mlp in mlps:
            skip.update((id(mlp.gate_proj.weight), id(mlp.up_proj.weight)))
            if hasattr(mlp, "down_proj"):   # until prepare_for_inference moves it to w_down_t
                skip.add(id(mlp.down_proj.weight))
        # NOTE: parameters() lists a tied weight once, as num_params counts it. A quantized
        # linear's per-row scales, an int8 FFN's scales (buffers named *_scale; counted whole,
        # though a step reads only its rows' ones: 4 bytes a row against `hidden` bytes), and
        # the int8 copy of a tied head (a buffer named `weight`, so
        # the tied parameter is still counted once: engine/models/quantized.py), are read too;
        # q/k/v_proj's scales are views of the fused w_qkv_scale, so each storage counts once.
        non_ffn_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
        storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes()
                    for name, b in model.named_buffers() if name.endswith((".weight", "scale"))}
        non_ffn_bytes += sum(storages.values())
        used = [mlp.predictor for mlp in mlps if mlp.predictor is not None and mlp.use_predictor]
        return cls(total_params=model.num_params(), hidden_size=cfg.hidden_size,
                   intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                   predictor_params=sum(p.num_params for p in used),
                   non_ffn_bytes=non_ffn_bytes,
                   ffn_weight_bytes=_bytes_per_weight(mlps[0].gate_proj.weight),
                   predictor_weight_bytes=predictors[0].fc1.weight.element_size() if predictors else 0)

    @property
    def num_neurons(self) -> int:
        return self.intermediate_size * self.num_layers

    @property
    def ffn_params(self) -> int:
        return self.num_neurons * 3 * self.hidden_size

    @property
    def num_ffn_rows(self) -> int:
        """Gate, up and down rows of every layer: what a dense step reads."""
        return 3 * self.num_neurons

    @property
    def dense_bytes(self) -> int:
        """Bytes of the model's weights (predictors excluded): what a dense step reads."""
        return round(self.non_ffn_bytes + self.ffn_params * self.ffn_weight_bytes)

    def activated_params(self, num_active: int) -> int:
        """num_active: active neurons of one token summed over layers."""
        return self.total_params - (self.num_neurons - num_active) * 3 * self.hidden_size

    def sparsity(self, num_active: int) -> float:
        return (self.num_neurons - num_active) / self.num_neurons

    def computed_params(self, num_rows_read: int, num_predictor_params_read: int) -> int:
        """Parameters one step read: num_rows_read FFN rows over all layers (as the kernels
        reported them) and the predictor weights read, the rest of the model whole."""
        return (self.total_params - self.ffn_params + num_rows_read * self.hidden_size
                + num_predictor_params_read)

    def computed_fraction(self, num_rows_read: int) -> float:
        """Share of the FFN weight rows one step read."""
        return num_rows_read / self.num_ffn_rows

    def read_bytes(self, num_rows_read: int, num_predictor_params_read: int) -> int:
        """Bytes one step read: computed_params' reads at their stored sizes."""
        return round(self.non_ffn_bytes + num_rows_read * self.hidden_size * self.ffn_weight_bytes
                     + num_predictor_params_read * self.predictor_weight_bytes)
