"""One device-to-host transfer per step (engine/worker/readback.py): the sampled ids, logprobs and
every layer's FFN counts come back together, and come back right."""
from __future__ import annotations

import torch

from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.worker.readback import StepReadback


def test_fetch_restores_every_part():
    readback = StepReadback()
    parts = [torch.tensor([3, 2**40, -1]), torch.tensor([[0.5, -2.25], [1e-3, 7.0]]), torch.zeros(2, 0),
             torch.tensor([7], dtype=torch.int32)]
    handles = [readback.add(p) for p in parts]
    host = readback.fetch()
    assert host[handles[0]] == [3.0, float(2**40), -1.0]
    assert host[handles[1]] == [[0.5, -2.25], [torch.tensor(1e-3).item(), 7.0]]
    assert host[handles[2]] == [[], []]
    assert host[handles[3]] == [7.0]
    assert StepReadback().fetch() == []


def test_a_step_reads_back_once(relu_checkpoint, monkeypatch):
    llm = LLM(str(relu_checkpoint))
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(tuple(self.shape))
        return real(self)
    runner = llm.engine.runner
    execute = runner.execute

    def counted_execute(out):
        calls.clear()
        monkeypatch.setattr(torch.Tensor, "tolist", counting)
        try:
            return execute(out)
        finally:
            monkeypatch.setattr(torch.Tensor, "tolist", real)
            assert len(calls) == 1, calls
    monkeypatch.setattr(runner, "execute", counted_execute)
    params = [SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=3, temperature=0.9, seed=2, ignore_eos=True, frequency_penalty=0.5)]
    results = llm.generate([[5, 6, 7, 8], [9, 10]], params)
    assert [len(r.completions[0].token_ids) for r in results] == [4, 3]
