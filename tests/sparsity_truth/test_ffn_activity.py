"""The FFN module reports what its path read: the kernel's rows (recounted here from the layer's
inputs), the predictor's weights when it ran, and the dense pass of a shadow check."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_serve.engine.models.ffn import SparseMLP
from sparse_serve.kernels import cpu_native
from tests.sparsity_truth.read_model import MARGIN, native_rows, neurons

H, I, RANK, T = 64, 160, 8, 3


def layer(act: str, predictor: bool, seed: int) -> tuple[SparseMLP, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A layer, its inputs (x normed, residual) and the predicted mask (float64 reference), for
    the first seed from `seed` whose predictor logits and activations sit off their boundaries."""
    for attempt in range(seed, seed + 200):
        gen = torch.Generator().manual_seed(attempt)
        mlp = SparseMLP(H, I, act, 0.0, RANK if predictor else None)
        with torch.no_grad():
            for p in mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        mlp.prepare_for_inference()
        x, residual = torch.randn(T, H, generator=gen), torch.randn(T, H, generator=gen)
        predicted = None
        if predictor:
            logits = F.relu(residual.double() @ mlp.predictor.fc1.weight.double().t()) \
                @ mlp.predictor.fc2.weight.double().t()                      # [T, I]
            if logits.abs().min() <= MARGIN:
                continue
            predicted = logits > 0
        try:
            neurons(x, mlp.gate_proj.weight, mlp.up_proj.weight, act, 0.0, predicted)
        except AssertionError:
            continue
        return mlp, x, residual, predicted
    raise AssertionError("no seed keeps the inputs off the decision boundaries")


@pytest.mark.skipif(not cpu_native.available(), reason="no C++ compiler for the native kernel")
@pytest.mark.parametrize("predictor", [True, False], ids=["predicted", "exact"])
def test_sparse_path_reports_kernel_rows_and_predictor(predictor):
    mlp, x, residual, predicted = layer("drelu", predictor, seed=5)
    mlp.dense_fallback_fraction = 1.0
    _, activity = mlp(x, residual)
    n = neurons(x, mlp.gate_proj.weight, mlp.up_proj.weight, "drelu", 0.0, predicted)
    lib = cpu_native.load()
    expected = native_rows(n, "drelu", predictor, H, bool(lib.sparse_ffn_cpu_prefetches()),
                           lib.sparse_ffn_cpu_row_chunk())
    assert activity.rows_read.tolist() == [int(m.sum()) for m in expected]
    assert int(activity.rows_read.sum()) < 3 * I
    assert activity.predictor_params_read == (RANK * H + I * RANK if predictor else 0)
    assert torch.equal(activity.active_counts, n.active.sum(1).to(torch.int32))


def test_dense_path_and_shadow_check_read_everything_they_run():
    mlp, x, residual, _ = layer("drelu", True, seed=9)
    mlp.use_sparse_kernels = False
    _, activity = mlp(x, residual)
    assert activity.rows_read.tolist() == [I, I, I]
    assert activity.predictor_params_read == RANK * H + I * RANK
    mlp.use_sparse_kernels, mlp.dense_fallback_fraction, mlp.shadow_check = True, 1.0, True
    _, shadowed = mlp(x, residual)
    mlp.shadow_check = False
    _, plain = mlp(x, residual)
    assert shadowed.rows_read.tolist() == (plain.rows_read + I).tolist()    # the check's dense pass
    mlp.use_predictor = False                                             # predictor off: not read
    _, unpredicted = mlp(x, residual)
    assert unpredicted.predictor_params_read == 0
