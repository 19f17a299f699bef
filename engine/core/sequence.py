"""One generated choice of one request: its tokens and where it stands (pure Python, no torch).

A request with `n` choices becomes `n` Sequences sharing a request_id (index 0..n-1). The
scheduler owns the status and the counters; the block manager owns `block_table`; the model
runner reads `token_ids`, `num_computed_tokens` and `block_table` to build its tensors.
"""
from __future__ import annotations

import enum
import itertools
import time
from typing import Any

from sparse_serve.engine.core.sampling_params import SamplingParams

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float | None = None) -> None:
        if not prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id: int = next(_seq_counter)
        self.request_id = request_id
        self.index = index
        self.params = params
        # NOTE: one list for prompt + output, appended in place, so the runner never
        # concatenates and a preempted sequence recomputes exactly what it had.
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.scheduled_time: float | None = None   # first admission (time.time()), for queue time
        self.num_preemptions = 0
        # Structured outputs: this choice's grammar matcher (engine/structured/bitmask.py),
        # created when it first samples, dropped when it finishes.
        self.grammar_state: Any = None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, index={self.index}, "
                f"status={self.status.name}, tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
