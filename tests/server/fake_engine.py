"""A test double for engine.async_engine.AsyncEngine: same interface, no model.

It is faithful where the server depends on the engine: `generate` is an async generator that
validates before its first yield, yields per-choice deltas from a background step loop, honours
max_tokens / min_tokens / stop / stop_token_ids / ignore_eos / seed / logprobs / logit_bias
(a bias of 100 forces a token, as it would in a real sampler), fills RequestStats on the last
output, refuses with EngineOverloadedError when the waiting queue is full and with
PromptTooLongError past the context window, and frees its (counted) KV blocks on finish,
on abort, and when the consumer stops iterating.
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.errors import EngineDeadError, EngineOverloadedError, PromptTooLongError
from engine.outputs import (CompletionDelta, EngineStats, RequestOutput, RequestStats, StepStats,
                            TokenLogprob, TopLogprob)
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

BOS_ID, EOS_ID = 256, 257
ALPHABET = "abcdefghijklmnopqrstuvwxyz "


class FakeChatTemplateError(ValueError):
    pass


class FakeTokenizer:
    """Byte-level: ids 0..255 are bytes, 256 is <s>, 257 is </s>."""

    vocab_size = 258
    eos_token_id = EOS_ID

    def __init__(self, has_chat_template: bool = True) -> None:
        self.has_chat_template = has_chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS_ID] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        if token_id == BOS_ID:
            return "<s>"
        if token_id == EOS_ID:
            return "</s>"
        return bytes([token_id]).decode("latin-1")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            raise FakeChatTemplateError("no chat template")
        if messages and messages[-1]["role"] == "system" and len(messages) == 1:
            raise FakeChatTemplateError("a conversation needs a user message")
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True))


class _Choice:
    def __init__(self, index: int, rng: random.Random) -> None:
        self.index = index
        self.rng = rng
        self.token_ids: list[int] = []
        self.text = ""
        self.num_emitted_chars = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None


class _Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                 num_cached: int, base_seed: int) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.stats = RequestStats(arrival_time=time.time(), num_prompt_tokens=len(prompt_ids),
                                  num_cached_tokens=num_cached)
        seed = params.seed if params.seed is not None else base_seed
        self.choices = [_Choice(i, random.Random(seed * 1000 + i)) for i in range(params.n)]
        self.num_blocks = 0
        self.finished = False


class FakeEngine:
    def __init__(self, config: EngineConfig, *, has_chat_template: bool = True, step_delay_s: float = 0.002,
                 max_model_len: int = 256, num_blocks: int = 512) -> None:
        self.config = config
        self.tokenizer = FakeTokenizer(has_chat_template)
        self.model_name = config.model.served_model_name or "fake-sparse"
        self.max_model_len = config.model.max_model_len or max_model_len
        self.total_params = 1_000_000
        self.num_layers = 2
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self.step_delay_s = step_delay_s
        self.block_size = config.cache.block_size
        self.num_total_blocks = num_blocks
        self.num_free_blocks = num_blocks
        self.aborted_ids: list[str] = []
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._seen_prompts: set[tuple[int, ...]] = set()
        self._seed_counter = 0
        self._loop_task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "FakeEngine":
        return cls(config)

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._loop_task = asyncio.create_task(self._loop())

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        for req in list(self._requests.values()):
            req.queue.put_nowait(EngineDeadError("engine shut down"))
            self._release(req)

    def get_stats(self) -> EngineStats:
        used = self.num_total_blocks - self.num_free_blocks
        return EngineStats(num_running=len(self._running), num_waiting=len(self._waiting),
                           num_total_blocks=self.num_total_blocks, num_free_blocks=self.num_free_blocks,
                           kv_cache_usage=used / self.num_total_blocks,
                           per_layer_sparsity=[0.9] * self.num_layers)

    async def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self.aborted_ids.append(request_id)
            self._release(req)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if self._loop_task is None:
            raise EngineDeadError("engine is not running")
        params.validate(self.tokenizer.vocab_size)
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if any(not 0 <= t < self.tokenizer.vocab_size for t in prompt_ids):
            raise ValueError("Invalid value for 'prompt': token id outside the vocabulary")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + max(max_tokens, 1) > self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens, but "
                f"{len(prompt_ids) + max_tokens} were requested ({len(prompt_ids)} in the prompt, "
                f"{max_tokens} for the completion).")
        if len(self._waiting) >= self.config.scheduler.max_queued_requests:
            raise EngineOverloadedError(f"{len(self._waiting)} requests are already waiting")
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id}")
        key = tuple(prompt_ids)
        cached = (len(prompt_ids) - 1) // self.block_size * self.block_size if key in self._seen_prompts else 0
        self._seen_prompts.add(key)
        self._seed_counter += 1
        req = _Request(request_id, prompt_ids, params, max_tokens, cached, self._seed_counter)
        self._requests[request_id] = req
        self._waiting.append(req)
        self._wakeup.set()
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not req.finished:  # the consumer stopped early (GeneratorExit / CancelledError)
                self.aborted_ids.append(request_id)
                self._release(req)

    # -- the step loop ---------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self._running and not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            started = time.perf_counter()
            num_prefill = 0
            while self._waiting and len(self._running) < self.config.scheduler.max_num_seqs:
                req = self._waiting.popleft()
                req.stats.scheduled_time = time.time()
                self._running.append(req)
                num_prefill += len(req.prompt_ids)
            num_generated = 0
            for req in list(self._running):
                num_generated += self._step(req)
            step = StepStats(duration_s=time.perf_counter() - started, num_seqs=len(self._running),
                             num_prefill_tokens=num_prefill, num_decode_tokens=len(self._running),
                             num_generated_tokens=num_generated,
                             per_layer_active_fraction=[0.1] * self.num_layers,
                             per_layer_computed_fraction=[0.2] * self.num_layers)
            for listener in self.step_listeners:
                listener(step)
            await asyncio.sleep(self.step_delay_s)

    def _step(self, req: _Request) -> int:
        now = time.time()
        deltas = []
        for choice in req.choices:
            if choice.finish_reason is None:
                deltas.append(self._advance(req, choice))
        req.stats.first_token_time = req.stats.first_token_time or now
        req.stats.token_times.append(now)
        needed = math.ceil((len(req.prompt_ids) + max(len(c.token_ids) for c in req.choices)) / self.block_size)
        if needed > req.num_blocks:
            grow = min(needed - req.num_blocks, self.num_free_blocks)
            req.num_blocks += grow
            self.num_free_blocks -= grow
        finished = all(c.finish_reason is not None for c in req.choices)
        out = RequestOutput(req.request_id, req.prompt_ids, deltas, finished=finished)
        if finished:
            stats = req.stats
            stats.finished_time = now
            stats.num_generated_tokens = sum(len(c.token_ids) for c in req.choices)
            stats.total_params = self.total_params
            stats.mean_ffn_sparsity = 0.875
            stats.mean_activated_params = self.total_params * 0.3
            stats.mean_computed_fraction = 0.2
            out.stats = stats
            req.finished = True
            self._release(req)
        req.queue.put_nowait(out)
        return len(deltas)

    def _advance(self, req: _Request, choice: _Choice) -> CompletionDelta:
        params = req.params
        token_id = self._sample(req, choice)
        choice.token_ids.append(token_id)
        logprobs = None
        if params.logprobs is not None:
            logprob = -0.1 - (token_id % 7) / 10
            top = [TopLogprob(t, self.tokenizer.token_text(t), -0.1 - k / 5)
                   for k, t in enumerate(sorted({token_id, *range(97, 97 + params.logprobs)})[:params.logprobs])]
            logprobs = [TokenLogprob(token_id, self.tokenizer.token_text(token_id), logprob, top)]
        num_generated = len(choice.token_ids)
        if token_id == EOS_ID and not params.ignore_eos and num_generated > params.min_tokens:
            choice.finish_reason = "stop"
        elif token_id in params.stop_token_ids and num_generated > params.min_tokens:
            choice.finish_reason, choice.stop_reason = "stop", token_id
        else:
            choice.text += self.tokenizer.decode([token_id])
            for stop in params.stop:
                pos = choice.text.find(stop)
                if pos >= 0:
                    choice.text = choice.text[:pos]
                    choice.finish_reason, choice.stop_reason = "stop", stop
                    break
        if choice.finish_reason is None and num_generated >= req.max_tokens:
            choice.finish_reason = "length"
        # Hold back a tail that could still become a stop string, until we know.
        hold = 0
        if choice.finish_reason is None:
            for stop in params.stop:
                for k in range(min(len(stop) - 1, len(choice.text)), 0, -1):
                    if choice.text.endswith(stop[:k]):
                        hold = max(hold, k)
                        break
        end = len(choice.text) - hold
        text = choice.text[choice.num_emitted_chars:end]
        choice.num_emitted_chars = max(choice.num_emitted_chars, end)
        return CompletionDelta(choice.index, [token_id], text, logprobs, choice.finish_reason, choice.stop_reason)

    def _sample(self, req: _Request, choice: _Choice) -> int:
        params = req.params
        forced = [t for t, bias in params.logit_bias.items() if bias >= 100]
        if forced and len(choice.token_ids) >= params.min_tokens:
            return forced[0]
        if params.greedy:
            # A fixed function of the prompt and position: the same for every choice.
            position = sum(req.prompt_ids) + len(choice.token_ids)
            return ord(ALPHABET[position % len(ALPHABET)])
        return ord(choice.rng.choice(ALPHABET))

    def _release(self, req: _Request) -> None:
        req.finished = True
        self._requests.pop(req.request_id, None)
        if req in self._running:
            self._running.remove(req)
        if req in self._waiting:
            self._waiting.remove(req)
        self.num_free_blocks += req.num_blocks
        req.num_blocks = 0
