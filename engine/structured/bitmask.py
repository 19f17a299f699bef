"""Step-time constraint: per-sequence matchers and the logits mask (the model runner's one call).

Each constrained Sequence gets its own `GrammarState` (n > 1 siblings included) the first time
it samples. The matcher is synchronised from the sequence's own output tokens right before its
mask is filled, so it is always exactly as far as the tokens the sequence holds:
- an accepted token is the one appended by the previous step;
- preemption by recompute keeps the output tokens, so the state stays right; should a sequence
  ever hold fewer tokens than the matcher accepted, the matcher rolls back to match;
- finish and abort drop the state with the sequence (Scheduler.finish_sequence releases it).
When the grammar is complete the mask allows only the engine's EOS ids, so the sequence stops
as on any EOS (finish_reason "stop").
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from sparse_serve.engine.structured.compiler import Grammar

logger = logging.getLogger(__name__)


class GrammarState:
    """One sequence's matcher and how many of its output tokens it has accepted."""

    def __init__(self, grammar: Grammar):
        import xgrammar as xgr

        self.grammar = grammar
        self.matcher = xgr.GrammarMatcher(grammar.compiled,
                                          override_stop_tokens=list(grammar.stop_token_ids))
        self.num_accepted = 0
        self.broken = False        # a token the grammar refused was appended (see sync)

    def sync(self, output_token_ids: list[int]) -> None:
        """Accept the tokens appended since the last call (rolling back if there are fewer)."""
        if len(output_token_ids) < self.num_accepted:
            self.matcher.rollback(self.num_accepted - len(output_token_ids))
            self.num_accepted = len(output_token_ids)
        for token_id in output_token_ids[self.num_accepted:]:
            if self.broken or not self.matcher.accept_token(token_id):
                # NOTE: only possible when every token was masked (nothing left to sample);
                # the sequence is then ended with EOS rather than continued unconstrained.
                if not self.broken:
                    logger.error("grammar matcher refused token %d after %d tokens; ending the sequence",
                                 token_id, self.num_accepted)
                self.broken = True
            self.num_accepted += 1

    @property
    def only_eos(self) -> bool:
        """Nothing but EOS may follow: the grammar is complete (or was broken)."""
        return self.broken or self.matcher.is_terminated()

    def fill_only_eos(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].zero_()
        token_id = self.grammar.stop_token_ids[0]
        bitmask[row, token_id // 32] |= _bit(token_id % 32)


_BATCH_MATCHER = None


def _batch_matcher():
    global _BATCH_MATCHER
    if _BATCH_MATCHER is None:
        import xgrammar as xgr

        _BATCH_MATCHER = xgr.BatchGrammarMatcher(max_threads="auto")
    return _BATCH_MATCHER


def _bit(position: int) -> int:
    # int32 two's complement: bit 31 is the sign bit
    return (1 << position) - (1 << 32 if position == 31 else 0)


def grammar_state(seq: Any) -> GrammarState | None:
    """The sequence's GrammarState, created on first use; None for unconstrained sequences."""
    grammar = seq.params.grammar
    if grammar is None:
        return None
    if seq.grammar_state is None:
        seq.grammar_state = GrammarState(grammar)
    return seq.grammar_state


def apply_grammar_bitmasks(logits: torch.Tensor, seqs: list[Any]) -> None:
    """In place: in each constrained row, every token the row's grammar does not allow next
    becomes -inf. Unconstrained rows are not touched. logits: [S, V], one row per seq."""
    rows, states = [], []
    for row, seq in enumerate(seqs):
        state = grammar_state(seq)
        if state is not None:
            state.sync(seq.output_token_ids)
            rows.append(row)
            states.append(state)
    if not rows:
        return
    import xgrammar as xgr

    num_rows, width = logits.shape
    vocab_size = states[0].grammar.vocab_size
    bitmask = xgr.allocate_token_bitmask(num_rows, vocab_size)          # [S, ceil(V/32)] int32, CPU
    live_rows, matchers = [], []
    for row, state in zip(rows, states):
        if state.only_eos:
            state.fill_only_eos(bitmask, row)
        else:
            live_rows.append(row)
            matchers.append(state.matcher)
    if len(matchers) == 1:
        matchers[0].fill_next_token_bitmask(bitmask, live_rows[0])
    elif matchers:
        # NOTE: xgrammar fills the rows on its own threads (the GIL released), which is what
        # keeps the step's CPU cost flat as constrained rows grow on a many-core host.
        _batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask, live_rows)
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(width, vocab_size), indices=rows)
    if width > vocab_size:
        # NOTE: embedding rows past the tokenizer (padding) have no text: never allowed.
        index = torch.tensor(rows, device=logits.device)
        logits[index, vocab_size:] = float("-inf")
