"""FCFS scheduler with a token budget, chunked prefill and preemption by recompute
(pure Python, no torch: it speaks sequences, token counts and block ids).

Prefill and decode are one case: every step, each scheduled sequence's computed tokens catch
up with its total tokens, as far as the step's token budget allows. One engine step is
`schedule()` -> model runner -> `update_from_output()`.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from sparse_serve.engine.core.block_manager import BlockManager
from sparse_serve.engine.core.config import SchedulerConfig
from sparse_serve.engine.core.errors import PromptTooLongError
from sparse_serve.engine.core.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int      # compute tokens [num_computed, num_computed + num_new)

    @property
    def samples(self) -> bool:
        """True iff this step catches the sequence up, so the runner samples a token for it.
        Read it between schedule() and update_from_output() (the latter advances the seq)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    num_batched_tokens: int
    # Sequences the scheduler had to end while scheduling (a lone sequence that outgrew the
    # whole KV cache, see Scheduler.schedule); update_from_output returns them too.
    finished: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 eos_token_ids: set[int], max_model_len: int) -> None:
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []        # admission order: the last one is the newest
        self.num_preemptions = 0
        self._unfinished: dict[str, list[Sequence]] = {}   # request_id -> its live sequences

    # ---- queues ---------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_sequence(self, seq: Sequence) -> None:
        if seq.num_tokens > self.max_model_len:
            raise PromptTooLongError(f"prompt has {seq.num_tokens} tokens, the context window "
                                     f"is {self.max_model_len}")
        bm = self.block_manager
        if bm.num_blocks_for(seq.num_tokens + 1) > bm.num_blocks:
            raise PromptTooLongError(f"prompt has {seq.num_tokens} tokens, the KV cache holds "
                                     f"{bm.num_blocks * bm.block_size}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._unfinished.setdefault(seq.request_id, []).append(seq)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        finished: list[Sequence] = []

        # 1. Running sequences first, oldest first, so decodes keep flowing; a prompt admitted
        # as a chunk continues here. NOTE: the victim of a preemption is the newest running
        # sequence, i.e. this one or one after it, so never one already scheduled this step.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:   # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            while not self.block_manager.can_allocate(seq, num_new):
                if len(self.running) == 1:
                    # NOTE: alone, with every other block free: it outgrew the whole cache.
                    self._finish_outgrown(seq, finished)
                    break
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.block_manager.allocate(seq, num_new)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

        # 2. Admit waiting sequences, FCFS. NOTE: not in a step that had to preempt: the
        # preempted sequence sits at the front and would be readmitted straight away.
        if not preempted:
            budget = self._admit_waiting(budget, scheduled, finished)

        return SchedulerOutput(scheduled=scheduled, preempted=preempted,
                               num_batched_tokens=sum(e.num_new_tokens for e in scheduled),
                               finished=finished)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSeq],
                       finished: list[Sequence]) -> int:
        bm = self.block_manager
        held_back: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            source = self._sibling_with_prompt(seq)
            if source is False:
                held_back.append(seq)
                continue
            if bm.enable_prefix_caching:
                num_cached = bm.match_prefix(seq)
            elif source is not None:
                num_cached = bm.share_prefix(seq, source)
            else:
                num_cached = 0
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.can_allocate(seq, num_new):
                bm.free(seq)
                seq.num_computed_tokens = 0
                if not self.running:
                    # NOTE: only running sequences hold blocks, so the whole cache is free and
                    # still too small (add_sequence and the lone-sequence rule above keep this
                    # from happening; the guard keeps such a sequence from blocking the queue).
                    self._finish_outgrown(seq, finished)
                    continue
                # NOTE: FCFS: later sequences do not jump a head that waits for blocks; it is
                # admitted once running sequences finish or get preempted.
                self.waiting.appendleft(seq)
                break
            bm.allocate(seq, num_new)
            if seq.scheduled_time is None:                 # first admission
                seq.scheduled_time = time.time()
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(held_back))
        return budget

    def _sibling_with_prompt(self, seq: Sequence) -> Sequence | None | bool:
        """n > 1: siblings share the prompt's full blocks instead of computing them n times.
        Returns False while a running sibling is still computing the prompt (hold `seq` back
        until it is done), a running sibling whose prompt is computed (the source to share
        from), or None when no sibling runs."""
        siblings = self._unfinished.get(seq.request_id, ())
        source = None
        for other in siblings:
            if other is seq or other.status is not SequenceStatus.RUNNING:
                continue
            if other.num_computed_tokens < other.num_prompt_tokens:
                return False
            source = other
        return source

    def _finish_outgrown(self, seq: Sequence, finished: list[Sequence]) -> None:
        """A sequence that needs more KV than the whole cache holds can never continue: it ends
        with "length", as if the context window were the cache size (never a deadlock)."""
        logger.warning("%r outgrew the KV cache (%d blocks); finishing with 'length'",
                       seq, self.block_manager.num_blocks)
        self.finish_sequence(seq, "length")
        finished.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Free its blocks and requeue it at the front; it keeps its output tokens and
        recomputes prompt + output later, so what it generates is unchanged."""
        logger.debug("preempting %r", seq)
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- after the step -------------------------------------------------------------------
    def update_from_output(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Advance computed tokens, commit full computed blocks to the prefix cache, append the
        sampled tokens and apply the token-level stop rules. Returns the newly finished."""
        finished = list(output.finished)
        for entry in output.scheduled:
            seq = entry.seq
            if seq.status is not SequenceStatus.RUNNING:   # aborted while the model ran
                continue
            samples = entry.samples
            seq.num_computed_tokens += entry.num_new_tokens
            self.block_manager.commit_computed(seq)
            if not samples:
                continue
            if seq.seq_id not in sampled:
                raise KeyError(f"no sampled token for {seq!r}, which was due to sample")
            token_id = sampled[seq.seq_id]
            seq.append_token(token_id)
            stop = self._check_stop(seq, token_id)
            if stop is not None:
                self.finish_sequence(seq, *stop)
                finished.append(seq)
        return finished

    def _check_stop(self, seq: Sequence, token_id: int) -> tuple[str, int | None] | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return "stop", None
            if token_id in params.stop_token_ids:
                return "stop", token_id
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None

    def finish_sequence(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (also used by the engine for stop strings and aborts): leave the
        queues, free its blocks. A no-op on one already finished."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.grammar_state = None   # structured outputs: release its matcher
        siblings = self._unfinished.get(seq.request_id)
        if siblings is not None:
            siblings.remove(seq)
            if not siblings:
                del self._unfinished[seq.request_id]

    def abort_request(self, request_id: str, reason: str = "abort") -> list[Sequence]:
        seqs = list(self._unfinished.get(request_id, ()))
        for seq in seqs:
            self.finish_sequence(seq, reason)
        return seqs
