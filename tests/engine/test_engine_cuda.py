"""The engine on a CUDA device (Triton sparse FFN, predictor and paged-attention kernels).

Skipped without a GPU; bench/gpu_check.sh runs it on one. float32 weights, so the sparse and
dense paths, and the GPU and the CPU, must agree token for token.
"""
from __future__ import annotations

import pytest
import torch

from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams
from tests.engine.test_engine import GREEDY, prompts
from tests.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# NOTE: a fixed small KV cache: the default takes a fraction of the GPU's free memory.
CUDA = {"model.device": "cuda", "cache.num_blocks": 64}


@pytest.mark.parametrize("act,rank", [("relu", None), ("drelu", 16), ("fatrelu", None),
                                      ("silu", None)])
def test_cuda_sparse_equals_dense_and_cpu(tmp_path, act, rank):
    folder = make_tiny_checkpoint(tmp_path / act, act, predictor_rank=rank)
    batch = prompts(4, seed=11)
    params = SamplingParams(max_tokens=12, **GREEDY)
    fp32 = {**CUDA, "model.dtype": "float32"}
    dense = LLM(str(folder), **fp32, **{"model.sparse_kernels": False}).generate(batch, params)
    sparse = LLM(str(folder), **fp32, **{"model.sparse_kernels": True}).generate(batch, params)
    cpu = LLM(str(folder), **{"model.device": "cpu", "model.dtype": "float32"}).generate(batch, params)
    for d, s, c in zip(dense, sparse, cpu):
        assert s.completions[0].token_ids == d.completions[0].token_ids == c.completions[0].token_ids
        assert s.stats.mean_ffn_sparsity == d.stats.mean_ffn_sparsity == c.stats.mean_ffn_sparsity
        assert s.stats.mean_activated_params == d.stats.mean_activated_params
        if act != "silu":
            assert 0 < s.stats.mean_ffn_sparsity < 1


def test_cuda_bf16_default_dtype_runs(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "drelu", "drelu", predictor_rank=16)
    llm = LLM(str(folder), **CUDA)
    assert next(llm.engine.runner.model.parameters()).dtype == torch.bfloat16
    out = llm.generate(prompts(6, seed=3), SamplingParams(max_tokens=10, **GREEDY))
    assert all(len(r.completions[0].token_ids) == 10 for r in out)
    assert all(0 < r.stats.mean_ffn_sparsity < 1 for r in out)
