"""What the engine hands back to its callers (pure Python, no torch).

`AsyncEngine.generate` yields `RequestOutput` deltas: each carries only what is new since the
previous yield, per choice (`n` > 1 gives several choices). The last output of a request has
`finished=True` and `stats` filled in.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TopLogprob:
    token_id: int
    token: str            # the token's text as the tokenizer decodes it alone
    logprob: float


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class CompletionDelta:
    index: int                                 # choice index, 0..n-1
    token_ids: list[int]                       # tokens new since the last output
    text: str                                  # text new since the last output (never half a character)
    logprobs: list[TokenLogprob] | None = None # one per new token when requested
    finish_reason: str | None = None           # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None = None       # the stop string or stop token id that matched


@dataclass
class RequestStats:
    """Per-request timings (time.time() seconds) and counts. Sparsity numbers use
    engine/core/sparsity.py's definitions (docs/SPARSITY.md): the `mean_*` ones are means over
    the request's generated tokens; `read_*` are the request's share of every step it took
    part in (prompt steps included), by its tokens in the step."""
    arrival_time: float
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0              # summed over the n choices
    total_params: int = 0
    mean_activated_params: float = 0.0         # per generated token
    mean_ffn_sparsity: float = 0.0             # inactive / all FFN neurons, per generated token
    # per generated token: params the step that produced it read (the whole batch's reads)
    mean_computed_params: float = 0.0
    mean_computed_fraction: float = 0.0        # FFN weight rows that step read / all FFN rows
    read_params: float = 0.0                   # the request's share of the params its steps read
    read_bytes: float = 0.0                    # the same reads in bytes of the stored weights
    num_preemptions: int = 0
    token_times: list[float] = field(default_factory=list)  # time each new token was emitted
    finish_reasons: list[str] = field(default_factory=list)  # per choice, by index (when finished)

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionDelta]
    finished: bool = False
    stats: RequestStats | None = None          # set on the last output only


@dataclass
class EngineStats:
    """A snapshot of the engine for /metrics and logs."""
    num_running: int = 0
    num_waiting: int = 0
    num_total_blocks: int = 0
    num_free_blocks: int = 0
    block_size: int = 0                        # tokens per KV block
    kv_cache_usage: float = 0.0                # used blocks / all blocks
    num_preemptions: int = 0                   # since start
    prefix_cache_queries: int = 0              # tokens looked up, since start
    prefix_cache_hits: int = 0                 # tokens found, since start
    num_step_failures: int = 0                 # engine steps that raised, since start
    dead: bool = False                         # the engine stopped for good


@dataclass
class StepStats:
    """One engine step, handed to every listener in `AsyncEngine.step_listeners`."""
    duration_s: float
    num_seqs: int                  # sequences in the batch
    num_prefill_tokens: int        # tokens of sequences still catching up with their prompt
    num_decode_tokens: int         # one per decoding sequence
    num_generated_tokens: int      # tokens sampled this step
    num_preempted: int = 0
    # per layer: mean over the step's tokens of active / all FFN neurons
    per_layer_active_fraction: list[float] = field(default_factory=list)
    # per layer: FFN weight rows the step read (gate + up + down, as its kernel reported) / all
    per_layer_computed_fraction: list[float] = field(default_factory=list)
    read_params: int = 0           # params the step read (engine/core/sparsity.py computed_params)
    read_bytes: int = 0            # the same reads in bytes of the stored weights (sparsity.py read_bytes)
    dense_bytes: int = 0           # bytes a dense step reads: all the model's weights
    # predictor shadow check (only on sampled steps with a predictor): per layer
    predictor_recall: list[float] | None = None
    predictor_precision: list[float] | None = None

    @property
    def phase(self) -> str:
        if self.num_prefill_tokens and self.num_decode_tokens:
            return "mixed"
        return "prefill" if self.num_prefill_tokens else "decode"
