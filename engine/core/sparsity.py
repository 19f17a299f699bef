"""The one place that turns active-neuron counts into activated params and sparsity.

Neuron i is active for a token iff h_i != 0 after the activation (and predicted active when a
predictor is used). An inactive neuron saves its gate row, up row and down column:
3 * hidden parameters. Activated params per token = total_params - inactive * 3 * hidden.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SparsityAccounting:
    total_params: int
    hidden_size: int
    intermediate_size: int
    num_layers: int

    @property
    def num_neurons(self) -> int:
        return self.intermediate_size * self.num_layers

    @property
    def ffn_params(self) -> int:
        return self.num_neurons * 3 * self.hidden_size

    def activated_params(self, num_active: int) -> int:
        """num_active: active neurons of one token summed over layers."""
        return self.total_params - (self.num_neurons - num_active) * 3 * self.hidden_size

    def sparsity(self, num_active: int) -> float:
        return (self.num_neurons - num_active) / self.num_neurons
