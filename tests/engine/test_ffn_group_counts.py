"""SparseMLP hands the predictor's per-group counts to the FFN (the CUDA path's wiring)."""

import torch

from sparse_serve.engine.models import ffn as ffn_module
from sparse_serve.kernels.sparse_ffn import new_group_counts
from sparse_serve.kernels.sparse_ffn_ref import group_counts_ref, sparse_ffn_ref


def test_the_predictors_counts_reach_the_ffn(monkeypatch):
    torch.manual_seed(0)
    mlp = ffn_module.SparseMLP(32, 300, "relu", 0.0, predictor_rank=8)
    mlp.prepare_for_inference()
    # as on CUDA: a buffer is asked for (CPU tensors here), the predictor fills it, the FFN gets it
    buffers, seen = [], []

    def counts_buffer(x, num_neurons):
        buffers.append(new_group_counts(num_neurons, x.device).fill_(-1))
        return buffers[-1]

    monkeypatch.setattr(ffn_module, "group_counts_for", counts_buffer)
    real_sparse_ffn = ffn_module.sparse_ffn

    def spy(*args, predicted_group_counts=None, **kwargs):
        seen.append((kwargs["predicted"], predicted_group_counts))
        return real_sparse_ffn(*args, predicted_group_counts=predicted_group_counts, **kwargs)

    monkeypatch.setattr(ffn_module, "sparse_ffn", spy)
    x, residual = torch.randn(3, 32), torch.randn(3, 32)
    out, activity = mlp(x, residual)
    (predicted, counts), = seen
    assert counts is buffers[0]
    assert torch.equal(counts, group_counts_ref(predicted))
    ref, ref_active = sparse_ffn_ref(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.w_down_t,
                                     "relu", 0.0, predicted)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(activity.active_counts, ref_active.sum(-1, dtype=torch.int32))


def test_no_counts_without_the_sparse_kernels(monkeypatch):
    mlp = ffn_module.SparseMLP(16, 130, "relu", 0.0, predictor_rank=4)
    mlp.use_sparse_kernels = False   # the reference predictor has no counts to give
    monkeypatch.setattr(ffn_module, "group_counts_for", lambda x, n: 1 / 0)
    mlp(torch.randn(2, 16), torch.randn(2, 16))
