"""Per-request sampling and stopping parameters (pure Python, no torch).

The server maps OpenAI request fields onto this one dataclass; the scheduler, sampler and
output processor read it. `validate()` raises ValueError with a message that names the field,
which the server turns into a 400.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sparse_serve.engine.structured.params import StructuredOutputs

_MAX_LOGPROBS = 20  # OpenAI's own cap on top_logprobs
# NOTE: the sampler seeds a torch.Generator with seed + choice index; int64 keeps that in the
# range manual_seed takes (vLLM's bound too).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16          # None: up to the context window
    min_tokens: int = 0
    temperature: float = 1.0             # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                       # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None          # None: no logprobs; k >= 0: sampled token + top-k
    skip_special_tokens: bool = True
    # What the output must match (None: free text), and the compiled grammar the input
    # processor attaches to the engine's copy (an engine.structured.compiler.Grammar).
    structured: StructuredOutputs | None = None
    grammar: Any = field(default=None, repr=False, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self, **changes) -> "SamplingParams":
        """A copy sharing no mutable field with this one (the engine owns its copy)."""
        copy = dataclasses.replace(self, stop=list(self.stop), stop_token_ids=list(self.stop_token_ids),
                                   logit_bias=dict(self.logit_bias))
        return dataclasses.replace(copy, **changes) if changes else copy

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"Invalid value for '{name}': {why}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                bad(f.name, f"must be a finite number, got {value}")
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                bad(f.name, f"must be an integer, got {value!r}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            bad("seed", f"must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        if self.n < 1 or self.n > 16:
            bad("n", f"must be between 1 and 16, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            bad("min_tokens", f"must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"{self.min_tokens} is larger than max_tokens {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            bad("temperature", f"must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad("top_k", f"must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                bad(name, f"must be in [-2, 2], got {value}")
        if self.repetition_penalty <= 0.0:
            bad("repetition_penalty", f"must be positive, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= _MAX_LOGPROBS:
            bad("logprobs", f"must be in [0, {_MAX_LOGPROBS}], got {self.logprobs}")
        if len(self.stop) > 16:
            bad("stop", "at most 16 stop sequences")
        if any(not s for s in self.stop):
            bad("stop", "stop sequences must be non-empty")
        for s in self.stop:
            check_text("stop", s)
        for token_id, bias in self.logit_bias.items():
            if not math.isfinite(bias):
                bad("logit_bias", f"bias for token {token_id} must be a finite number, got {bias}")
            if vocab_size is not None and not 0 <= token_id < vocab_size:
                bad("logit_bias", f"token id {token_id} is outside the vocabulary (size {vocab_size})")
            if not -100.0 <= bias <= 100.0:
                bad("logit_bias", f"bias for token {token_id} must be in [-100, 100], got {bias}")
        for token_id in self.stop_token_ids:
            if vocab_size is not None and not 0 <= token_id < vocab_size:
                bad("stop_token_ids", f"token id {token_id} is outside the vocabulary (size {vocab_size})")
        if self.structured is not None:
            # NOTE: a finished grammar allows only EOS; banning EOS would leave nothing to sample.
            if self.ignore_eos:
                bad("ignore_eos", f"cannot be combined with a constrained output ('{self.structured.source}')")
            if self.min_tokens:
                bad("min_tokens", f"cannot be combined with a constrained output ('{self.structured.source}')")


def check_text(name: str, text: str) -> None:
    """Text the tokenizer can take: valid Unicode (JSON can carry lone surrogates, which no
    tokenizer encodes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"Invalid value for '{name}': not valid Unicode text ({exc.reason} at "
                         f"position {exc.start})") from None
