"""The engine's CUDA path, run on the CPU through Triton's interpreter, end to end.

tests/engine/test_engine_cuda.py runs the engine on a GPU; without one, the wiring between the
model and the kernels (the predictor counting its groups and handed the FFN's rows, the FFN
finding its neurons from those counts, paged attention reading the block table) would first run
on a lent device. Here every kernels entry point takes CPU tensors as it takes CUDA ones
(kernels.dispatch), and the engine must give the same greedy tokens and the same activation
counts as its reference path.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from sparse_serve.engine.core.llm import LLM  # noqa: E402
from sparse_serve.engine.core.sampling_params import SamplingParams  # noqa: E402
from sparse_serve.kernels import (  # noqa: E402
    dispatch,
    ffn_triton_compact,
    paged_attention_triton,  # noqa: E402
    predictor_triton,
    sparse_ffn_triton,
)
from sparse_serve.kernels.triton_utils import interpreting  # noqa: E402
from tests.engine.test_engine import GREEDY, prompts  # noqa: E402
from tests.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

CPU = {"model.device": "cpu", "model.dtype": "float32"}
# (on a GPU host the kernels are compiled and take no CPU tensors; test_engine_cuda.py runs there)
pytestmark = pytest.mark.skipif(not interpreting(), reason="needs Triton's interpreter")


def spy_launches(monkeypatch, module, name: str, calls: list[str]) -> None:
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("act, rank", [("drelu", 16), ("relu", None)])
def test_engine_on_the_triton_path_matches_its_reference(tmp_path, monkeypatch, act, rank):
    folder = make_tiny_checkpoint(tmp_path / act, act, predictor_rank=rank, num_layers=2,
                                  sliding_window=24)
    batch = prompts(3, seed=5)
    params = SamplingParams(max_tokens=6, **GREEDY)
    reference = LLM(str(folder), **CPU, **{"model.sparse_kernels": False}).generate(batch, params)

    monkeypatch.setattr(dispatch, "runs_triton", lambda t: True)
    calls: list[str] = []
    spy_launches(monkeypatch, sparse_ffn_triton, "sparse_ffn_triton", calls)
    spy_launches(monkeypatch, predictor_triton, "predict_active_triton", calls)
    spy_launches(monkeypatch, paged_attention_triton, "paged_attention_decode_triton", calls)
    counted = []
    real_counted = ffn_triton_compact._launch_gate_up_counted
    monkeypatch.setattr(ffn_triton_compact, "_launch_gate_up_counted",
                        lambda *args: counted.append(1) or real_counted(*args))
    triton = LLM(str(folder), **CPU).generate(batch, params)

    for ref, out in zip(reference, triton):
        assert out.completions[0].token_ids == ref.completions[0].token_ids
        assert out.stats.mean_ffn_sparsity == ref.stats.mean_ffn_sparsity
        assert out.stats.mean_activated_params == ref.stats.mean_activated_params
    assert "sparse_ffn_triton" in calls and "paged_attention_decode_triton" in calls
    if rank:   # the predicted layers: predictor with counts, and the FFN from those counts
        assert "predict_active_triton" in calls and counted
