"""Each request is charged its share of every step by tokens (prompt steps included), and each
generated token the params its own step read, on the real engine (CPU, tiny dReLU + predictors;
prompts of different lengths, chunked prefill, so steps mix prefill chunks with decodes)."""
from __future__ import annotations

import pytest
import torch

from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams
from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("charges") / "m", "drelu", num_layers=2, predictor_rank=8)
    llm = LLM(str(path), **{"scheduler.max_num_seqs": 4, "scheduler.max_num_batched_tokens": 16,
                            "model.dtype": "float32"})
    steps = []   # (stats, {request_id: tokens in the step}, {request_id: sampled in the step})
    real_step, real_run = llm.engine.step, llm.engine.runner.execute

    def execute(sched):
        steps.append([None, {}, {}])
        for item in sched.scheduled:
            rid = item.seq.request_id
            steps[-1][1][rid] = steps[-1][1].get(rid, 0) + item.num_new_tokens
            if item.samples:
                steps[-1][2][rid] = steps[-1][2].get(rid, 0) + 1
        return real_run(sched)

    def step():
        result = real_step()
        if result.stats is not None:
            steps[-1][0] = result.stats
        return result

    llm.engine.runner.execute, llm.engine.step = execute, step
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (3, 21, 9, 30)]
    params = [SamplingParams(max_tokens=3 + i, temperature=0.0, ignore_eos=True) for i in range(4)]
    results = llm.generate(prompts, params)
    return llm, steps, results


def test_shares_by_tokens_add_up_to_every_step(engine_run):
    _, steps, results = engine_run
    assert any(len(tokens) > 1 and max(tokens.values()) > 1 for _, tokens, _ in steps), "no mixed step"
    expected = {r.request_id: [0.0, 0.0] for r in results}
    for stats, tokens, _ in steps:
        assert stats.read_bytes == 4 * stats.read_params          # a float32 model: 4 bytes a weight
        step_tokens = sum(tokens.values())
        for rid, n in tokens.items():
            expected[rid][0] += stats.read_params * n / step_tokens
            expected[rid][1] += stats.read_bytes * n / step_tokens
    for r in results:
        assert r.stats.read_params == pytest.approx(expected[r.request_id][0], rel=1e-12)
        assert r.stats.read_bytes == pytest.approx(expected[r.request_id][1], rel=1e-12)
    assert sum(r.stats.read_params for r in results) == pytest.approx(sum(s.read_params for s, _, _ in steps))


def test_computed_per_token_is_its_step_reads(engine_run):
    _, steps, results = engine_run
    for r in results:
        sampled = [(stats.read_params, n[r.request_id]) for stats, _, n in steps if r.request_id in n]
        tokens = sum(k for _, k in sampled)
        assert tokens == r.stats.num_generated_tokens
        assert r.stats.mean_computed_params == pytest.approx(sum(p * k for p, k in sampled) / tokens)
        assert r.stats.mean_computed_params >= r.stats.mean_activated_params
