"""Inputs for the rows-read proofs: batches whose rows predict and fire different neurons, kept
off the activations' decision boundaries (read_model.MARGIN) so the count is unambiguous."""
from __future__ import annotations

import torch

from tests.sparsity_truth.read_model import Neurons, neurons

# Thresholds that silence about half of each row's neurons on these inputs (so that a batch of a
# few rows still leaves some neurons silent in every row).
THRESHOLD = {"silu": 0.25, "relu": 0.0, "drelu": 0.0, "fatrelu": 0.3}


def mixed_batch(T: int, H: int, I: int, act: str, predicted_share: float | None,
                dtype: torch.dtype = torch.float32, seed: int = 0):
    """(x [T, H], (w_gate, w_up, w_down_t) [I, H], predicted [T, I] or None, Neurons).

    Each row predicts its own random neurons (a share of them, different per row) and the
    weights give O(1) pre-activations, so every row fires a different set. Seeds from `seed`
    on are tried until no input sits within the margin of a decision (deterministic)."""
    for attempt in range(seed, seed + 200):
        gen = torch.Generator().manual_seed(attempt)
        x = torch.randn(T, H, generator=gen).to(dtype)
        ws = [(torch.randn(I, H, generator=gen) / H ** 0.5).to(dtype) for _ in range(3)]
        predicted = None
        if predicted_share is not None:
            predicted = torch.rand(T, I, generator=gen) < predicted_share
        try:
            found = neurons(x, ws[0], ws[1], act, THRESHOLD[act], predicted)
        except AssertionError:
            continue
        return x, ws, predicted, found
    raise AssertionError("no seed keeps the inputs off the decision boundaries")


def check_mixed(n: Neurons) -> None:
    """The batch really mixes: the union is larger than any row's own set (batches of several
    rows), and some candidate neuron is silent (so read > active somewhere)."""
    own = n.active.sum(1)
    if own.numel() > 1:
        assert int(n.A.sum()) > int(own.max()), "every row fires the same neurons"
    assert int(n.P.sum()) > int(n.A.sum()), "nothing read is silent: the test could not tell"
