"""Penalty statistics kept on the device (engine/worker/token_counts.py) and per-batch sampling
tensors (engine/worker/sampling_tensors.py) give exactly what the histories give."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.worker import model_runner
from sparse_serve.engine.worker.sampler import history_stats
from sparse_serve.engine.worker.token_counts import TokenCounts

V = 50


@dataclass
class FakeSeq:
    seq_id: int
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)


def test_recorded_counts_equal_the_histories():
    gen = torch.Generator().manual_seed(0)
    seqs = [FakeSeq(0, SamplingParams(repetition_penalty=1.3), [1, 2, 2, 9]),
            FakeSeq(1, SamplingParams(), [3]),                                # no penalties: zero rows
            FakeSeq(2, SamplingParams(frequency_penalty=0.5, presence_penalty=0.1), [4], [4, 7, 7])]
    counts = TokenCounts(V, torch.device("cpu"))
    for _ in range(6):
        counts.rows(seqs)                                   # catch up, as each step does
        sampled = torch.randint(0, V, (len(seqs),), generator=gen)
        counts.record(seqs, sampled)
        for seq, token in zip(seqs, sampled.tolist()):
            seq.output_token_ids.append(token)
        seen, count = counts.rows(seqs)
        ref_seen, ref_count = history_stats([s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                                            [s.output_token_ids for s in seqs], V, torch.device("cpu"))
        assert torch.equal(seen, ref_seen) and torch.equal(count, ref_count)
    counts.release(0)
    assert 0 not in counts._counts


def test_engine_penalties_match_the_history_path(relu_checkpoint, monkeypatch):
    prompts = [[5, 6, 7, 8, 5, 6], [9, 10, 11], [12, 13, 14, 15]]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(max_tokens=9, temperature=0.8, seed=3, ignore_eos=True, frequency_penalty=1.0,
                             presence_penalty=0.5),
              SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)]
    device_path = LLM(str(relu_checkpoint)).generate(prompts, params)

    def from_histories(self, seqs):
        return history_stats([s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                             [s.output_token_ids for s in seqs], self.vocab_size, self.device)
    monkeypatch.setattr(model_runner.TokenCounts, "rows", from_histories)
    history_path = LLM(str(relu_checkpoint)).generate(prompts, params)
    for a, b in zip(device_path, history_path):
        assert a.completions[0].token_ids == b.completions[0].token_ids
    # the penalties did something: the unpenalised greedy run differs for the first prompt
    plain = LLM(str(relu_checkpoint)).generate(prompts[:1], [SamplingParams(max_tokens=12, temperature=0.0,
                                                                             ignore_eos=True)])
    assert plain[0].completions[0].token_ids != device_path[0].completions[0].token_ids
