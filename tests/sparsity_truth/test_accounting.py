"""engine/core/sparsity.py on loaded models: the FFN/rest split and the bytes match the
checkpoint's sizes, tied or not, in float32 and bfloat16."""
from __future__ import annotations

import json

import pytest

from sparse_serve.engine.checkpoints.loader import load_model
from sparse_serve.engine.core.config import ModelConfig
from sparse_serve.engine.core.sparsity import SparsityAccounting
from tests.tiny_checkpoint import make_tiny_checkpoint

RANK = 8


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("bfloat16", 2)])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_accounting_of_a_loaded_model(tmp_path, dtype, size, tied):
    folder = make_tiny_checkpoint(tmp_path / "m", "drelu", predictor_rank=RANK, tie_word_embeddings=tied)
    cfg = json.loads((folder / "config.json").read_text())
    H, I, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    model, _ = load_model(ModelConfig(dtype=dtype, device="cpu"), folder)
    acc = SparsityAccounting.of_model(model)
    ffn = 3 * L * I * H
    assert acc.ffn_params == ffn and acc.num_ffn_rows == 3 * L * I
    # the rest of the model, counted the way total_params counts it (a tied head once)
    assert acc.non_ffn_bytes == (acc.total_params - ffn) * size
    assert acc.total_params - ffn >= (1 if tied else 2) * V * H
    assert acc.dense_bytes == acc.total_params * size
    predictor = L * (RANK * H + I * RANK)
    assert acc.predictor_params == predictor
    # a dense step with its predictors; an FFN-less step reads the rest alone
    assert acc.computed_params(3 * L * I, predictor) == acc.total_params + predictor
    assert acc.read_bytes(3 * L * I, predictor) == (acc.total_params + predictor) * size
    assert acc.read_bytes(0, 0) == acc.non_ffn_bytes
    # every neuron active: activated is the whole model, and reading the three rows of each is too
    assert acc.activated_params(L * I) == acc.computed_params(3 * L * I, 0) == acc.total_params
