"""The official openai SDK (sync and async) against a live uvicorn server."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, wait_until

MODEL = "tiny-sparse"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
# NOTE: tests that count tokens ignore EOS, so a real model stopping early cannot break them.
NO_EOS = {"ignore_eos": True}


@pytest.fixture
def client(live_server):
    with openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def test_chat_completion(client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7, extra_body=NO_EOS)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == MODEL
    [choice] = resp.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    usage = resp.usage
    assert usage.completion_tokens == 7
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    extra = usage.model_extra
    assert extra["total_params"] > 0
    assert 0 < extra["activated_params"] <= extra["total_params"]
    assert 0.0 <= extra["ffn_sparsity"] < 1.0


def test_repeated_prompt_reports_cached_tokens(client):
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    second = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, extra_body=NO_EOS)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_chat_n2_and_seed_reproducible(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, n=2, seed=1234, temperature=1.0,
                  extra_body=NO_EOS)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 24
    other = client.chat.completions.create(**{**kwargs, "seed": 99})
    assert [c.message.content for c in other.choices] != [c.message.content for c in a.choices]


def test_chat_stop_string(client):
    greedy = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[3:5]
    stopped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10,
                                             temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.find(stop)]


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 3


def test_completions(client):
    resp = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, logprobs=2,
                                     extra_body=NO_EOS)
    assert resp.object == "text_completion"
    [choice] = resp.choices
    assert choice.text and choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 6
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 6
    offsets = choice.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    # NOTE: at most 2: distinct ids whose text is the same (partial UTF-8) share a dict key.
    assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs)


def test_completions_batch_echo_and_token_prompt(client):
    resp = client.completions.create(model=MODEL, prompt=["ab", "cd"], max_tokens=3, n=2, echo=True,
                                     extra_body=NO_EOS)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text[:2] for c in resp.choices] == ["ab", "ab", "cd", "cd"]
    assert resp.usage.completion_tokens == 12
    token_ids = httpx.post(f"{client.base_url}".replace("/v1/", "/tokenize"),
                           json={"prompt": "hi", "add_special_tokens": False}).json()["tokens"]
    ids = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=3, echo=True)
    assert ids.choices[0].text.startswith("hi")


def test_completions_stream(client):
    stream = client.completions.create(model=MODEL, prompt="x", max_tokens=4, stream=True,
                                       stream_options={"include_usage": True}, extra_body=NO_EOS)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) != ""
    assert chunks[-1].usage.completion_tokens == 4


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_sdk_error_types(client):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert not_found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3.5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            tool_choice={"type": "function", "function": {"name": "g"}})
    assert tools.value.body["param"] == "tool_choice"


@pytest.mark.parametrize("engine_config", [{"server.api_keys": [API_KEY]}], indirect=True)
def test_sdk_authentication_error(live_server):
    bad = openai.OpenAI(base_url=live_server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=live_server.base_url, api_key=API_KEY, max_retries=0)
    assert good.models.list().data[0].id == MODEL


# One sequence runs, one waits; a third request finds the waiting queue full.
ONE_SEAT = {"scheduler.max_num_seqs": 1, "scheduler.max_queued_requests": 1}


@pytest.mark.parametrize("engine_config", [ONE_SEAT], indirect=True)
def test_sdk_rate_limit_error(live_server, client):
    # NOTE: a streamed response starts once its first token exists (so that refusals keep
    # their status code), so the two long requests are consumed in threads.
    long = dict(model=MODEL, messages=MESSAGES, max_tokens=150, extra_body=NO_EOS)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.chat.completions.create, **long)
        assert wait_until(lambda: live_server.engine.get_stats().num_running == 1)
        second = pool.submit(client.chat.completions.create, **long)
        assert wait_until(lambda: live_server.engine.get_stats().num_waiting == 1)
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        assert exc.value.response.headers["retry-after"] == "1"
        assert exc.value.body["code"] == "engine_overloaded"
        assert first.result().usage.completion_tokens == 150
        assert second.result().usage.completion_tokens == 150


def test_async_client(live_server):
    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=live_server.base_url, api_key="x", max_retries=0) as client:
            chat, completion = await asyncio.gather(
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, n=2),
                client.completions.create(model=MODEL, prompt="abc", max_tokens=3, extra_body=NO_EOS))
            assert len(chat.choices) == 2 and completion.usage.completion_tokens == 3
            stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                                          stream=True, stream_options={"include_usage": True},
                                                          extra_body=NO_EOS)
            pieces = [c async for c in stream]
            assert pieces[-1].usage.completion_tokens == 4
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="other", prompt="a")
            with pytest.raises(openai.BadRequestError):
                await client.completions.create(model=MODEL, prompt="a", suffix="z")
            models = await client.models.list()
            assert models.data[0].id == MODEL

    asyncio.run(main())
