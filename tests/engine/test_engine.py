"""The engine end to end on a tiny random checkpoint (CPU)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from sparse_serve.engine.core.async_engine import AsyncEngine
from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.engine.core.errors import EngineOverloadedError, PromptTooLongError
from sparse_serve.engine.core.input_processor import EngineRequest
from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.llm_engine import LLMEngine
from sparse_serve.engine.core.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_llm(path, **overrides) -> LLM:
    return LLM(str(path), **{"model.sparse_kernels": False, **overrides})


def request(engine: AsyncEngine, ids: list[int], params: SamplingParams, request_id: str) -> EngineRequest:
    [built] = engine.processor.completion_requests([ids], params, [request_id])
    return built


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 290, (int(torch.randint(3, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def transformers_greedy(path, prompt: list[int], num_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=2, max_new_tokens=num_tokens)
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()


def test_batch_invariance_and_transformers(relu_checkpoint):
    batch = prompts(8)
    params = SamplingParams(max_tokens=16, **GREEDY)
    together = make_llm(relu_checkpoint).generate(batch, params)
    alone_llm = make_llm(relu_checkpoint, **{"scheduler.max_num_seqs": 1})
    for prompt, result in zip(batch, together):
        alone = alone_llm.generate([prompt], params)[0]
        assert result.completions[0].token_ids == alone.completions[0].token_ids
    for prompt, result in list(zip(batch, together))[:3]:
        assert result.completions[0].token_ids == transformers_greedy(relu_checkpoint, prompt, 16)


def test_chunked_prefill_gives_same_tokens(relu_checkpoint):
    long_prompt = prompts(1, seed=5)[0] * 4
    params = SamplingParams(max_tokens=8, **GREEDY)
    whole = make_llm(relu_checkpoint).generate([long_prompt], params)[0]
    chunked_llm = make_llm(relu_checkpoint, **{"scheduler.max_num_batched_tokens": 7})
    chunked = chunked_llm.generate([long_prompt, prompts(1, seed=6)[0]], params)[0]
    assert chunked.completions[0].token_ids == whole.completions[0].token_ids


def test_preemption_keeps_outputs(relu_checkpoint):
    batch = prompts(6, seed=1)
    params = SamplingParams(max_tokens=40, **GREEDY)
    roomy = make_llm(relu_checkpoint).generate(batch, params)
    tight = make_llm(relu_checkpoint, **{"cache.num_blocks": 12, "cache.block_size": 8})
    cramped = tight.generate(batch, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [r.completions[0].token_ids for r in cramped] == [r.completions[0].token_ids for r in roomy]
    assert tight.engine.block_manager.num_free_blocks == 12


def test_prefix_caching_reports_cached_tokens(relu_checkpoint):
    llm = make_llm(relu_checkpoint, **{"cache.block_size": 8})
    prefix = prompts(1, seed=2)[0] * 3   # >= 3 full blocks
    params = SamplingParams(max_tokens=6, **GREEDY)
    first = llm.generate([prefix + [7, 8]], params)[0]
    second = llm.generate([prefix + [7, 8]], params)[0]
    assert first.stats.num_cached_tokens == 0
    assert second.stats.num_cached_tokens >= 16
    assert second.completions[0].token_ids == first.completions[0].token_ids
    assert llm.engine.block_manager.prefix_cache_hits >= 16


def test_seeded_sampling_is_reproducible_across_batch_mixes(relu_checkpoint):
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=12, temperature=1.3, ignore_eos=True)
    prompt = prompts(1, seed=3)[0]
    llm = make_llm(relu_checkpoint)
    alone = llm.generate([prompt], seeded)[0].completions[0].token_ids
    mixed = llm.generate(prompts(3, seed=4) + [prompt], [other, other, other, seeded])[3].completions[0].token_ids
    assert mixed == alone
    different = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99,
                                                      ignore_eos=True))[0].completions[0].token_ids
    assert different != alone


def _spanning_stop(tokenizer, token_ids: list[int]) -> str | None:
    """Last char of one token's text + first char of the next one's, from clean UTF-8 only."""
    texts = [tokenizer.decode(token_ids[:i]) for i in range(len(token_ids) + 1)]
    for i in range(1, len(token_ids) - 1):
        a, b = texts[i][len(texts[i - 1]):], texts[i + 1][len(texts[i]):]
        if a and b and "\ufffd" not in texts[i + 1] and texts[i].startswith(texts[i - 1]) \
                and texts[i + 1].startswith(texts[i]):
            return a[-1] + b[0]
    return None


def test_stop_string_spanning_tokens_is_cut(relu_checkpoint):
    llm = make_llm(relu_checkpoint)
    for seed in range(20):
        prompt = prompts(1, seed=100 + seed)[0]
        free = llm.generate([prompt], SamplingParams(max_tokens=20, **GREEDY))[0].completions[0]
        stop = _spanning_stop(llm.engine.tokenizer, free.token_ids)
        if stop is not None:
            break
    assert stop is not None, "no clean two-token span in 20 generations"
    stopped = llm.generate([prompt], SamplingParams(max_tokens=20, stop=[stop], **GREEDY))[0].completions[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:free.text.index(stop)]


def test_n_choices_and_stats(relu_checkpoint):
    llm = make_llm(relu_checkpoint)
    result = llm.generate([prompts(1, seed=8)[0]], SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=7,
                                                                 ignore_eos=True))[0]
    assert len(result.completions) == 3
    assert len({tuple(c.token_ids) for c in result.completions}) > 1
    stats = result.stats
    assert stats.num_generated_tokens == 15
    assert 0 < stats.mean_ffn_sparsity < 1
    assert stats.mean_activated_params < stats.total_params
    assert stats.mean_computed_fraction >= 1 - stats.mean_ffn_sparsity - 1e-9


def test_prompt_too_long_names_both_numbers(relu_checkpoint):
    llm = make_llm(relu_checkpoint, **{"model.max_model_len": 64})
    with pytest.raises(PromptTooLongError, match=r"64 tokens.*requested 70 tokens \(60 in the prompt, 10"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10))


def async_engine(path, **overrides) -> AsyncEngine:
    config = EngineConfig.load(overrides={"model.path": str(path), "model.sparse_kernels": False, **overrides})
    return AsyncEngine(LLMEngine(config, str(path)))


def test_async_abort_frees_blocks_and_overload(relu_checkpoint):
    async def scenario():
        engine = async_engine(relu_checkpoint, **{"scheduler.max_queued_requests": 2, "scheduler.max_num_seqs": 1})
        await engine.start()
        total = engine.get_stats().num_total_blocks
        params = SamplingParams(max_tokens=200, **GREEDY)
        gen = engine.generate(request(engine, [5, 6, 7, 8], params, "a"))
        first = await gen.__anext__()
        assert first.outputs[0].token_ids
        # queue: "a" runs (max_num_seqs=1), so two more wait and the third is refused
        waiting = [engine.generate(request(engine, [9, 10], SamplingParams(max_tokens=2, **GREEDY), f"w{i}")) for i in range(2)]
        tasks = [asyncio.create_task(_drain(g)) for g in waiting]
        await asyncio.sleep(0)
        with pytest.raises(EngineOverloadedError):
            await engine.generate(request(engine, [1, 2], params, "refused")).__anext__()
        await gen.aclose()                       # the consumer goes away mid-generation
        results = await asyncio.gather(*tasks)
        assert all(r.finished for r in results)
        for _ in range(100):
            if engine.get_stats().num_free_blocks == total and not engine.core.requests:
                break
            await asyncio.sleep(0.01)
        stats = engine.get_stats()
        await engine.shutdown()
        return stats, total

    stats, total = asyncio.run(scenario())
    assert stats.num_free_blocks == total and stats.num_running == 0


def test_every_final_output_reaches_the_request_listeners_aborts_included(relu_checkpoint):
    # The server counts finished requests from these listeners: one whose consumer went away
    # is aborted with no one reading its stream, and must reach them too, once, with its
    # choices' reasons ("abort", or how a choice that ended before the abort ended).
    async def scenario():
        engine = async_engine(relu_checkpoint)
        finals = []
        engine.request_listeners.append(finals.append)
        await engine.start()
        done = await _drain(engine.generate(request(engine, [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY), "done")))
        gen = engine.generate(request(engine, [5, 6, 7, 8], SamplingParams(max_tokens=200, n=2, **GREEDY), "left"))
        await gen.__anext__()
        await gen.aclose()                       # the consumer goes away mid-generation
        for _ in range(100):
            if len(finals) == 2:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return done, finals

    done, finals = asyncio.run(scenario())
    assert [out.request_id for out in finals] == ["done", "left"]
    assert all(out.finished and out.stats is not None for out in finals)
    assert finals[0].stats.finish_reasons == ["length"] == done.stats.finish_reasons
    assert finals[1].stats.finish_reasons == ["abort", "abort"]
    assert finals[1].stats.num_prompt_tokens == 4


async def _drain(gen):
    last = None
    async for out in gen:
        last = out
    return last


def test_min_tokens_bans_eos_until_reached(relu_checkpoint):
    llm = make_llm(relu_checkpoint)
    prompt = prompts(1, seed=9)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    first = free.completions[0].token_ids[0]
    # make the first greedy token the "EOS": without min_tokens it stops at once
    stopped = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first]))[0]
    assert stopped.completions[0].token_ids == [first] and stopped.completions[0].finish_reason == "stop"
    held = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first],
                                                 min_tokens=4))[0].completions[0]
    assert first not in held.token_ids[:4] and len(held.token_ids) >= 4


@pytest.mark.parametrize("act,rank", [("relu", None), ("drelu", 16), ("fatrelu", None)])
def test_sparse_kernels_on_and_off_agree(tmp_path, act, rank):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / act, act, predictor_rank=rank)
    batch = prompts(4, seed=11)
    params = SamplingParams(max_tokens=12, **GREEDY)
    dense = LLM(str(folder), **{"model.sparse_kernels": False}).generate(batch, params)
    sparse = LLM(str(folder), **{"model.sparse_kernels": True}).generate(batch, params)
    for d, s in zip(dense, sparse):
        assert s.completions[0].token_ids == d.completions[0].token_ids
        assert s.stats.mean_ffn_sparsity == d.stats.mean_ffn_sparsity
        assert s.stats.mean_activated_params == d.stats.mean_activated_params
        assert 0 < s.stats.mean_ffn_sparsity < 1
