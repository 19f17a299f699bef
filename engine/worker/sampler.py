"""Turns one step's logits into one token per row (torch; called by the model runner only).

Order of operations follows vLLM: logit_bias -> repetition penalty -> presence/frequency
penalties -> logprobs (from these processed logits, before temperature) -> greedy argmax, or
temperature -> top_k -> top_p -> min_p -> exponential-race sampling.

Every step is vectorised over all rows: per-row parameters are [S, 1] tensors
(engine/worker/sampling_tensors.py, built once per batch composition by the runner), and a row
that does not use a transform gets its neutral value, so mixed batches need no Python loop over
rows. Penalties read token statistics the runner keeps on the device
(engine/worker/token_counts.py); called without them, the sampler builds both from the request.
The only per-row loop draws exponential noise from seeded rows' own generators, which is what
makes a seeded row's token independent of the rest of the batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.worker.readback import StepReadback
from sparse_serve.engine.worker.sampling_tensors import SamplingTensors

logger = logging.getLogger(__name__)

# NOTE: Exponential(1) noise can in principle round to 0.0; dividing by it would turn a
# zero-probability (masked) token into NaN and a kept one into inf. Clamping the noise to a
# tiny positive value keeps the race well defined without measurably biasing it.
_MIN_NOISE = 1e-20

TokenLogprobs = tuple[float, list[tuple[int, float]]]


@dataclass
class SamplerOutput:
    token_ids: list[int]                          # one per row
    # per row: (logprob of the chosen token, top-k (token_id, logprob) sorted desc), or None
    # when that row's params.logprobs is None
    logprobs: list[TokenLogprobs | None]
    device_token_ids: torch.Tensor | None = None  # [S] int64, where they were sampled


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """One generator per seeded sequence, created once and kept by the engine; None for
    unseeded sequences, which then draw from the global RNG."""
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def history_stats(params: list[SamplingParams], prompt_token_ids: list[list[int]],
                  output_token_ids: list[list[int]], vocab_size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(seen [S, V] bool: token in prompt or output, counts [S, V] float32: output occurrences),
    built from the histories. Rows without penalties stay zero. The engine keeps these on the
    device instead (engine/worker/token_counts.py); this is the reference and the offline path."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0
            or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    seen = torch.zeros(len(params), vocab_size, dtype=torch.bool)
    counts = torch.zeros(len(params), vocab_size, dtype=torch.float32)
    for i in rows:
        seen[i, torch.tensor(prompt_token_ids[i] + output_token_ids[i], dtype=torch.long)] = True
        outputs = torch.tensor(output_token_ids[i], dtype=torch.long)
        counts[i].index_put_((outputs,), torch.ones(len(outputs)), accumulate=True)
    return seen.to(device), counts.to(device)


def apply_logit_bias(logits: torch.Tensor, tensors: SamplingTensors) -> None:
    """In place: logits[row, token] += bias for each row's logit_bias entries."""
    if tensors.bias_index is not None:
        logits.index_put_(tensors.bias_index, tensors.bias_values.to(logits.dtype), accumulate=True)


def apply_penalties(logits: torch.Tensor, tensors: SamplingTensors, seen: torch.Tensor,
                    counts: torch.Tensor) -> None:
    """In place. Repetition (CTRL-style) on tokens in prompt or output: positive logits divided
    by the penalty, negative ones multiplied by it. Then OpenAI's formula on generated tokens:
    logit -= frequency_penalty * count + presence_penalty * (count > 0)."""
    if tensors.repetition is not None:
        penalty = tensors.repetition.to(logits.dtype)                              # [S, 1]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        torch.where(seen, penalised, logits, out=logits)
    if tensors.frequency is not None or tensors.presence is not None:
        counts = counts.to(logits.dtype)
        if tensors.frequency is not None:
            logits -= tensors.frequency * counts
        if tensors.presence is not None:
            logits -= tensors.presence * (counts > 0).to(logits.dtype)


def _top_k_top_p(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """Masks (to -inf) tokens outside each row's top_k, then outside its top_p nucleus of the
    renormalised remainder. top_k <= 0 and top_p == 1 mean off for that row."""
    num_rows, vocab_size = logits.shape
    k_list = [kk if 0 < kk < vocab_size else vocab_size for kk in tensors.top_k]
    k = tensors.k                                                               # [R, 1]
    use_top_p = any(p < 1.0 for p in tensors.top_p)
    max_k = max(k_list)
    if not use_top_p:
        # NOTE: without top_p a partial topk is enough: the k-th largest logit is the cutoff
        # (ties with it are kept). Rows with top_k off get a -inf cutoff.
        active_k = [kk for kk in k_list if kk < vocab_size]
        if not active_k:
            return logits
        max_active_k = max(active_k)
        top_values = logits.topk(max_active_k, dim=-1).values                  # [R, max_k]
        cutoff = top_values.gather(1, k.clamp(max=max_active_k) - 1)          # [R, 1]
        cutoff = cutoff.masked_fill(k >= vocab_size, float("-inf"))
        return logits.masked_fill(logits < cutoff, float("-inf"))
    # NOTE: a full sort of [64, 50k] costs ~0.5 s on two CPU cores; when every row has a
    # top_k, the nucleus lies inside the top max_k candidates and a partial topk suffices.
    if max_k < vocab_size:
        sorted_logits, sorted_ids = logits.topk(max_k, dim=-1)                 # [R, K]
    else:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)       # [R, V]
    positions = torch.arange(sorted_logits.shape[1], device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(positions >= k, float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # A token is kept when the mass strictly before it is below p; the first always is.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= tensors.p.to(logits.dtype), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_ids, sorted_logits)


def _sample_rows(logits: torch.Tensor, tensors: SamplingTensors,
                 generators: list[torch.Generator | None]) -> torch.Tensor:
    """Samples one token per row of `logits` [R, V]; returns int64 ids [R] (no host sync)."""
    device = logits.device
    logits = logits / tensors.temperature.to(logits.dtype)
    if any(k > 0 for k in tensors.top_k) or any(p < 1.0 for p in tensors.top_p):
        logits = _top_k_top_p(logits, tensors)
    probs = logits.softmax(dim=-1)                                              # [R, V]
    if tensors.min_p is not None:
        threshold = tensors.min_p.to(probs.dtype) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    # Exponential race (gpt-fast): argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p
    # (renormalisation is unnecessary), and it needs no host sync, unlike torch.multinomial.
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        noise.exponential_()
    else:
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        if unseeded:
            index = torch.tensor(unseeded, device=device)
            noise[index] = torch.empty(len(unseeded), probs.shape[1], dtype=probs.dtype,
                                       device=device).exponential_()
    return (probs / noise.clamp_(min=_MIN_NOISE)).argmax(dim=-1)


class Sampler:
    """Stateless; per-sequence state (generators, token statistics) is passed in each call."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               prompt_token_ids: list[list[int]], output_token_ids: list[list[int]],
               generators: list[torch.Generator | None], *, tensors: SamplingTensors | None = None,
               token_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> DeviceSample:
        """One token per row, left on the device (no host sync). tensors: this batch's
        SamplingTensors (built here when None); token_stats: (seen, counts) kept on the device by
        the engine (built from the histories when None)."""
        num_rows, vocab_size = logits.shape
        assert logits.dim() == 2, f"logits must be [S, V], got {tuple(logits.shape)}"
        assert len(params) == len(prompt_token_ids) == len(output_token_ids) \
            == len(generators) == num_rows, "one params/prompt/output/generator per row"
        # NOTE: always work on a float32 copy: the transforms below run in place and the
        # caller's logits (possibly a view of the model's output buffer) must stay untouched.
        logits = logits.to(dtype=torch.float32, copy=True)                      # [S, V]
        if tensors is None:
            tensors = SamplingTensors.build(params, vocab_size, logits.device)

        apply_logit_bias(logits, tensors)
        if tensors.repetition is not None or tensors.frequency is not None or tensors.presence is not None:
            seen, counts = token_stats if token_stats is not None else history_stats(
                params, prompt_token_ids, output_token_ids, vocab_size, logits.device)
            apply_penalties(logits, tensors, seen, counts)

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = logits[logprob_rows].log_softmax(dim=-1) if logprob_rows else None

        greedy_rows, sampled_rows = tensors.greedy_rows, tensors.sampled_rows
        if len(greedy_rows) == num_rows:
            token_ids = logits.argmax(dim=-1)
        elif len(sampled_rows) == num_rows:
            token_ids = _sample_rows(logits, tensors, generators)
        else:
            token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)  # [S]
            greedy_index, sampled_index = tensors.greedy_index, tensors.sampled_index
            token_ids[greedy_index] = logits[greedy_index].argmax(dim=-1)
            token_ids[sampled_index] = _sample_rows(
                logits[sampled_index], tensors.rows(sampled_rows, sampled_index),
                [generators[i] for i in sampled_rows])

        sampled = DeviceSample(token_ids, logprob_rows, [params[i].logprobs for i in logprob_rows])
        if logprobs is not None:
            row_index = torch.tensor(logprob_rows, device=token_ids.device)
            sampled.chosen = logprobs.gather(1, token_ids[row_index].unsqueeze(1)).squeeze(1)  # [L]
            max_k = max(sampled.top_k)
            if max_k > 0:
                top = logprobs.topk(max_k, dim=-1)
                sampled.top_values, sampled.top_ids = top.values, top.indices           # [L, K]
        return sampled

    def __call__(self, *args, **kwargs) -> SamplerOutput:
        """sample() and its own read-back (the runner shares one read-back with its counts)."""
        readback = StepReadback()
        sampled = self.sample(*args, **kwargs)
        handles = sampled.register(readback)
        return sampled.output(readback.fetch(), handles)


@dataclass
class DeviceSample:
    """A step's sampled ids and logprobs, still on the device until the step's read-back."""
    token_ids: torch.Tensor                        # [S] int64
    logprob_rows: list[int]
    top_k: list[int]                               # per logprob row: top logprobs asked for
    chosen: torch.Tensor | None = None             # [L] logprob of each chosen token
    top_values: torch.Tensor | None = None         # [L, K]
    top_ids: torch.Tensor | None = None            # [L, K]

    def register(self, readback: StepReadback) -> list[int]:
        return [readback.add(t) for t in (self.token_ids, self.chosen, self.top_values, self.top_ids)
                if t is not None]

    def output(self, host: list[list], handles: list[int]) -> SamplerOutput:
        parts = iter(host[h] for h in handles)
        token_ids = [int(t) for t in next(parts)]
        logprobs: list[TokenLogprobs | None] = [None] * len(token_ids)
        if self.chosen is not None:
            chosen = next(parts)
            top_values, top_ids = (next(parts), next(parts)) if self.top_values is not None else (None, None)
            for j, row in enumerate(self.logprob_rows):
                k = self.top_k[j]
                top = [(int(i), v) for i, v in zip(top_ids[j][:k], top_values[j][:k])] if k > 0 else []
                logprobs[row] = (chosen[j], top)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs, device_token_ids=self.token_ids)
