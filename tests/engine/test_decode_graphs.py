"""Decode buckets and padding (engine/worker/decode_graphs.py) on the CPU, capture replaced by
direct calls: the same tokens and the same per-request activity as eager steps, for batches that
shrink through every bucket and are padded on the way (padding must not change any count)."""
from __future__ import annotations

import pytest
import torch

from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.worker.decode_graphs import capture_sizes
from tests.tiny_checkpoint import make_tiny_checkpoint


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


@pytest.fixture(scope="module", params=["relu", "drelu-predicted", "silu-threshold"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("graphs") / request.param
    if request.param == "relu":
        return make_tiny_checkpoint(folder, "relu", num_layers=2), {}
    if request.param == "drelu-predicted":
        # the predictor at a positive threshold: predicted mode with a real mask
        return (make_tiny_checkpoint(folder, "drelu", num_layers=2, predictor_rank=16),
                {"model.predictor_threshold": 0.05})
    return make_tiny_checkpoint(folder, "silu", num_layers=2), {"model.ffn_act": "silu", "model.act_threshold": 0.05}


def _run(path, overrides, graphs: bool):
    # NOTE: the dense fallback is pinned off: padding rows change the batch's density, and the
    # CPU dispatch must not pick a different (equally right, differently rounded) path.
    llm = LLM(str(path), **{"scheduler.max_num_seqs": 7, "model.dense_fallback_fraction": 1.0, **overrides})
    runner = llm.engine.runner
    buckets = []
    if graphs:
        runner.init_decode_graphs(llm.engine.max_model_len, capture=False)
        run = runner.decode_graphs.run
        runner.decode_graphs.run = lambda batch: (buckets.append(
            (len(batch.token_ids), runner.decode_graphs.bucket(len(batch.token_ids)))), run(batch))[1]
    else:
        assert runner.decode_graphs is None, "a CPU engine decodes eagerly by default"
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 290, (5 + 3 * i,), generator=gen).tolist() for i in range(7)]
    # different lengths, so the batch shrinks 7 -> 1 through buckets 7, 4, 2, 1 and is padded on the way
    params = [SamplingParams(max_tokens=2 + 2 * i, temperature=0.0, ignore_eos=True) for i in range(7)]
    results = llm.generate(prompts, params)
    return results, buckets


def test_buckets_give_the_eager_tokens_and_counts(checkpoint):
    path, overrides = checkpoint
    eager, _ = _run(path, overrides, graphs=False)
    bucketed, buckets = _run(path, overrides, graphs=True)
    assert {(6, 7), (3, 4), (1, 1)} <= set(buckets), buckets       # padded buckets ran
    for a, b in zip(eager, bucketed):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        sa, sb = a.stats, b.stats
        assert sb.mean_activated_params == sa.mean_activated_params
        assert sb.mean_ffn_sparsity == sa.mean_ffn_sparsity
        assert sb.mean_computed_fraction == pytest.approx(sa.mean_computed_fraction, abs=0)
        assert 0 < sa.mean_ffn_sparsity < 1                          # the counts are not trivial


def test_negative_predictor_threshold_decodes_eagerly(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", "drelu", num_layers=1, predictor_rank=8)
    llm = LLM(str(path), **{"model.predictor_threshold": -0.5})
    llm.engine.runner.init_decode_graphs(llm.engine.max_model_len, capture=False)
    assert llm.engine.runner.decode_graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_give_the_eager_tokens_on_cuda(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", "drelu", num_layers=2, predictor_rank=16)
    common = {"model.device": "cuda", "model.dtype": "float32", "scheduler.max_num_seqs": 7,
              "model.predictor_threshold": 0.05}
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 290, (5 + 3 * i,), generator=gen).tolist() for i in range(7)]
    params = [SamplingParams(max_tokens=2 + 2 * i, temperature=0.0, ignore_eos=True) for i in range(7)]
    graphs = LLM(str(path), **common)
    assert graphs.engine.runner.decode_graphs is not None and graphs.engine.runner.decode_graphs.capture
    eager = LLM(str(path), **common, **{"model.enforce_eager": True})
    assert eager.engine.runner.decode_graphs is None
    for a, b in zip(eager.generate(prompts, params), graphs.generate(prompts, params)):
        assert a.completions[0].token_ids == b.completions[0].token_ids
