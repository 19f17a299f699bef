"""Engine-side bookkeeping for one request: its sequences, detokenizers and running stats."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from sparse_serve.engine.core.outputs import CompletionDelta, RequestOutput, RequestStats, TokenLogprob, TopLogprob
from sparse_serve.engine.core.sequence import Sequence
from sparse_serve.engine.core.sparsity import SparsityAccounting
from sparse_serve.engine.text.detokenizer import IncrementalDetokenizer


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    stats: RequestStats
    pending: dict[int, CompletionDelta] = field(default_factory=dict)   # choice index -> delta
    sum_activated: float = 0.0
    sum_sparsity: float = 0.0
    sum_computed: float = 0.0
    sum_computed_params: float = 0.0
    read_params: float = 0.0
    read_bytes: float = 0.0
    num_counted: int = 0

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def delta(self, index: int) -> CompletionDelta:
        if index not in self.pending:
            self.pending[index] = CompletionDelta(index=index, token_ids=[], text="")
        return self.pending[index]

    def charge_step(self, num_tokens: int, step_tokens: int, step_read_params: int,
                    step_read_bytes: int) -> None:
        """Charge one sequence its share of a step it took part in: its num_tokens of the step's
        step_tokens, of the params and bytes the step read (engine/core/sparsity.py)."""
        share = num_tokens / step_tokens
        self.read_params += step_read_params * share
        self.read_bytes += step_read_bytes * share

    def record_token(self, seq: Sequence, token_id: int, num_active: int, computed_params: int,
                     computed_fraction: float, accounting: SparsityAccounting,
                     logprob: TokenLogprob | None, now: float) -> None:
        """computed_params, computed_fraction: what the step that sampled the token read."""
        delta = self.delta(seq.index)
        delta.token_ids.append(token_id)
        if logprob is not None:
            delta.logprobs = (delta.logprobs or []) + [logprob]
        stats = self.stats
        if stats.first_token_time is None:
            stats.first_token_time = now
        stats.token_times.append(now)
        stats.num_generated_tokens += 1
        self.sum_activated += accounting.activated_params(num_active)
        self.sum_sparsity += accounting.sparsity(num_active)
        self.sum_computed += computed_fraction
        self.sum_computed_params += computed_params
        self.num_counted += 1

    def take_output(self, accounting: SparsityAccounting) -> RequestOutput | None:
        """The deltas gathered since the last call (None when there is nothing new)."""
        finished = self.finished
        if not self.pending and not finished:
            return None
        outputs = [self.pending[i] for i in sorted(self.pending)]
        self.pending = {}
        out = RequestOutput(self.request_id, self.prompt_token_ids, outputs, finished=finished)
        if finished:
            stats = self.stats
            stats.finished_time = time.time()
            stats.total_params = accounting.total_params
            stats.num_preemptions = sum(seq.num_preemptions for seq in self.seqs)
            stats.num_cached_tokens = max(seq.num_cached_tokens for seq in self.seqs)
            stats.finish_reasons = [seq.finish_reason
                                    for seq in sorted(self.seqs, key=lambda seq: seq.index)]
            stats.read_params, stats.read_bytes = self.read_params, self.read_bytes
            if self.num_counted:
                stats.mean_activated_params = self.sum_activated / self.num_counted
                stats.mean_ffn_sparsity = self.sum_sparsity / self.num_counted
                stats.mean_computed_fraction = self.sum_computed / self.num_counted
                stats.mean_computed_params = self.sum_computed_params / self.num_counted
            out.stats = stats
        return out


def make_logprob(tokenizer, token_id: int, raw) -> TokenLogprob:
    """raw: the sampler's (logprob of chosen token, [(token_id, logprob), ...])."""
    logprob, top = raw
    return TokenLogprob(token_id=token_id, token=tokenizer.token_text(token_id), logprob=float(logprob),
                        top=[TopLogprob(t, tokenizer.token_text(t), float(lp)) for t, lp in top])
