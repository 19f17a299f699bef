"""Pieces of OpenAI response bodies shared by the routes: usage and the two logprob shapes."""
from __future__ import annotations

from typing import Any

from sparse_serve.engine.core.outputs import RequestStats, TokenLogprob
from sparse_serve.server.generation import PromptResult


def usage(results: list[PromptResult], engine_total_params: int) -> dict[str, Any]:
    """OpenAI usage plus our extension (docs/SPARSITY.md): activated_params and computed_params
    (means per generated token, over all prompts and choices), total_params, ffn_sparsity (mean
    per generated token), and read_params / read_bytes (the request's share of what its steps
    read, summed)."""
    prompt_tokens = completion_tokens = cached_tokens = 0
    activated_sum = sparsity_sum = computed_sum = read_params = read_bytes = 0.0
    total_params = engine_total_params
    for result in results:
        stats: RequestStats | None = result.stats
        if stats is None:
            # NOTE: only a request that never finished lacks stats; count what we saw.
            prompt_tokens += len(result.prompt_token_ids)
            completion_tokens += sum(len(c.token_ids) for c in result.choices)
            continue
        prompt_tokens += stats.num_prompt_tokens
        completion_tokens += stats.num_generated_tokens
        cached_tokens += stats.num_cached_tokens
        activated_sum += stats.mean_activated_params * stats.num_generated_tokens
        sparsity_sum += stats.mean_ffn_sparsity * stats.num_generated_tokens
        computed_sum += stats.mean_computed_params * stats.num_generated_tokens
        read_params += stats.read_params
        read_bytes += stats.read_bytes
        total_params = stats.total_params or total_params
    weighted = completion_tokens or 1
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "activated_params": round(activated_sum / weighted),
        "total_params": total_params,
        "ffn_sparsity": round(sparsity_sum / weighted, 6),
        "computed_params": round(computed_sum / weighted),
        "read_params": round(read_params),
        "read_bytes": round(read_bytes),
    }


# NOTE: a token a grammar (or the sampler) ruled out has logprob -inf, which JSON cannot carry;
# it is sent as this floor instead (vLLM's choice too).
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    content = [
        {
            "token": lp.token,
            "logprob": _finite(lp.logprob),
            "bytes": _token_bytes(lp.token),
            "top_logprobs": [
                {"token": top.token, "logprob": _finite(top.logprob), "bytes": _token_bytes(top.token)}
                for top in lp.top
            ],
        }
        for lp in logprobs
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(logprobs: list[TokenLogprob] | None, text_offset: int) -> dict[str, Any] | None:
    """The legacy completions shape; `text_offset` is where the first token starts in the
    choice's text (so streamed chunks continue the offsets of earlier chunks)."""
    if logprobs is None:
        return None
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for lp in logprobs:
        tokens.append(lp.token)
        token_logprobs.append(_finite(lp.logprob))
        tops.append({top.token: _finite(top.logprob) for top in lp.top})
        offsets.append(text_offset)
        text_offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}
