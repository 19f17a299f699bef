"""Turns one step's logits into one token per row (torch; called by the model runner only).

Order of operations follows vLLM: logit_bias -> repetition penalty -> presence/frequency
penalties -> logprobs (from these processed logits, before temperature) -> greedy argmax, or
temperature -> top_k -> top_p -> min_p -> exponential-race sampling.

Every step is vectorised over all rows: per-row parameters become [S, 1] tensors, and a row
that does not use a transform gets its neutral value (penalty 1, top_k = V, top_p = 1,
min_p = 0), so mixed batches need no Python loop over rows. The only per-row loop draws
exponential noise from seeded rows' own generators, which is what makes a seeded row's token
independent of the rest of the batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sparse_serve.engine.core.sampling_params import SamplingParams

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


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """One generator per seeded sequence, created once and kept by the engine; None for
    unseeded sequences, which then draw from the global RNG."""
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def _flat_indices(rows: list[int], token_lists: list[list[int]],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs for every token of every listed row, as two int64 tensors."""
    row_index: list[int] = []
    token_index: list[int] = []
    for row, tokens in zip(rows, token_lists):
        row_index.extend([row] * len(tokens))
        token_index.extend(tokens)
    return (torch.tensor(row_index, dtype=torch.long, device=device),
            torch.tensor(token_index, dtype=torch.long, device=device))


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """In place: logits[row, token] += bias for each row's logit_bias entries."""
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return
    row_index: list[int] = []
    token_index: list[int] = []
    values: list[float] = []
    for i in rows:
        for token_id, bias in params[i].logit_bias.items():
            row_index.append(i)
            token_index.append(int(token_id))
            values.append(float(bias))
    device = logits.device
    logits.index_put_(
        (torch.tensor(row_index, device=device), torch.tensor(token_index, device=device)),
        torch.tensor(values, dtype=logits.dtype, device=device),
        accumulate=True,
    )


def apply_repetition_penalty(logits: torch.Tensor, params: list[SamplingParams],
                             prompt_token_ids: list[list[int]],
                             output_token_ids: list[list[int]]) -> None:
    """In place, CTRL-style: for tokens seen in prompt or output, positive logits are divided
    by the penalty and negative ones multiplied by it."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if not rows:
        return
    num_rows, vocab_size = logits.shape
    device = logits.device
    seen_ids = [prompt_token_ids[i] + output_token_ids[i] for i in rows]
    row_index, token_index = _flat_indices(rows, seen_ids, device)
    seen = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)   # [S, V]
    seen[row_index, token_index] = True
    penalty = torch.tensor([p.repetition_penalty for p in params],
                           dtype=logits.dtype, device=device).unsqueeze(1)     # [S, 1]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    torch.where(seen, penalised, logits, out=logits)


def apply_presence_frequency_penalties(logits: torch.Tensor, params: list[SamplingParams],
                                       output_token_ids: list[list[int]]) -> None:
    """In place, OpenAI's formula on generated tokens only:
    logit -= frequency_penalty * count + presence_penalty * (count > 0)."""
    rows = [i for i, p in enumerate(params)
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    if not rows:
        return
    num_rows, vocab_size = logits.shape
    device = logits.device
    row_index, token_index = _flat_indices(rows, [output_token_ids[i] for i in rows], device)
    counts = torch.zeros(num_rows, vocab_size, dtype=logits.dtype, device=device)  # [S, V]
    counts.index_put_((row_index, token_index),
                      torch.ones_like(token_index, dtype=logits.dtype), accumulate=True)
    frequency = torch.tensor([p.frequency_penalty for p in params],
                             dtype=logits.dtype, device=device).unsqueeze(1)   # [S, 1]
    presence = torch.tensor([p.presence_penalty for p in params],
                            dtype=logits.dtype, device=device).unsqueeze(1)    # [S, 1]
    logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Masks (to -inf) tokens outside each row's top_k, then outside its top_p nucleus of the
    renormalised remainder. top_k <= 0 and top_p == 1 mean off for that row."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    k_list = [kk if 0 < kk < vocab_size else vocab_size for kk in top_k]
    k = torch.tensor(k_list, dtype=torch.long, device=device).unsqueeze(1)     # [R, 1]
    use_top_p = any(p < 1.0 for p in top_p)
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
    positions = torch.arange(sorted_logits.shape[1], device=device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(positions >= k, float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # NOTE: rows with top_p off get an infinite p: cumsum rounding can push the running mass
    # past 1.0 in the far tail, which must not mask anything for them.
    p = torch.tensor([pp if pp < 1.0 else float("inf") for pp in top_p],
                     dtype=logits.dtype, device=device).unsqueeze(1)           # [R, 1]
    # A token is kept when the mass strictly before it is below p; the first always is.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_ids, sorted_logits)


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> torch.Tensor:
    """Samples one token per row of `logits` [R, V]; returns int64 ids [R] (no host sync)."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params],
                               dtype=logits.dtype, device=device).unsqueeze(1)  # [R, 1]
    logits = logits / temperature
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)                                              # [R, V]
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params],
                             dtype=probs.dtype, device=device).unsqueeze(1)     # [R, 1]
        threshold = min_p * probs.amax(dim=-1, keepdim=True)
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
    """Stateless; per-sequence state (generators, token histories) is passed in each call."""

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 prompt_token_ids: list[list[int]], output_token_ids: list[list[int]],
                 generators: list[torch.Generator | None]) -> SamplerOutput:
        num_rows = logits.shape[0]
        assert logits.dim() == 2, f"logits must be [S, V], got {tuple(logits.shape)}"
        assert len(params) == len(prompt_token_ids) == len(output_token_ids) \
            == len(generators) == num_rows, "one params/prompt/output/generator per row"
        # NOTE: always work on a float32 copy: the transforms below run in place and the
        # caller's logits (possibly a view of the model's output buffer) must stay untouched.
        logits = logits.to(dtype=torch.float32, copy=True)                      # [S, V]

        apply_logit_bias(logits, params)
        apply_repetition_penalty(logits, params, prompt_token_ids, output_token_ids)
        apply_presence_frequency_penalties(logits, params, output_token_ids)

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = logits[logprob_rows].log_softmax(dim=-1) if logprob_rows else None

        token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)  # [S]
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(greedy_rows) == num_rows:
            token_ids = logits.argmax(dim=-1)
        elif len(sampled_rows) == num_rows:
            token_ids = _sample_rows(logits, params, generators)
        else:
            greedy_index = torch.tensor(greedy_rows, device=logits.device)
            sampled_index = torch.tensor(sampled_rows, device=logits.device)
            token_ids[greedy_index] = logits[greedy_index].argmax(dim=-1)
            token_ids[sampled_index] = _sample_rows(
                logits[sampled_index], [params[i] for i in sampled_rows],
                [generators[i] for i in sampled_rows])

        return SamplerOutput(
            token_ids=token_ids.tolist(),
            logprobs=self._gather_logprobs(logprobs, logprob_rows, token_ids, params, num_rows),
        )

    @staticmethod
    def _gather_logprobs(logprobs: torch.Tensor | None, logprob_rows: list[int],
                         token_ids: torch.Tensor, params: list[SamplingParams],
                         num_rows: int) -> list[TokenLogprobs | None]:
        result: list[TokenLogprobs | None] = [None] * num_rows
        if logprobs is None:
            return result
        row_index = torch.tensor(logprob_rows, device=token_ids.device)
        chosen = logprobs.gather(1, token_ids[row_index].unsqueeze(1)).squeeze(1)  # [L]
        max_k = max(params[i].logprobs for i in logprob_rows)
        chosen_list = chosen.tolist()
        if max_k > 0:
            top = logprobs.topk(max_k, dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for j, row in enumerate(logprob_rows):
            k = params[row].logprobs
            top_list = list(zip(top_ids[j][:k], top_values[j][:k])) if k > 0 else []
            result[row] = (chosen_list[j], top_list)
        return result
