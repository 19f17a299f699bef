"""Offline API for scripts and benchmarks: `LLM(model).generate(prompts, params)`."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.engine.core.input_processor import InputProcessor
from sparse_serve.engine.core.llm_engine import LLMEngine
from sparse_serve.engine.core.outputs import RequestStats
from sparse_serve.engine.core.sampling_params import SamplingParams


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]     # one per choice (n)
    stats: RequestStats


class LLM:
    def __init__(self, model: str, config: EngineConfig | None = None, **overrides):
        """overrides: dotted config keys, e.g. LLM(path, **{"scheduler.max_num_seqs": 1})."""
        config = config or EngineConfig.load(overrides={"model.path": model, **overrides})
        self.engine = LLMEngine(config, model)
        # NOTE: offline use is single-threaded, so the processor shares the engine's tokenizer.
        self.processor = InputProcessor(self.engine.tokenizer, self.engine.max_model_len)
        self._ids = itertools.count()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[GenerationResult]:
        """Validated as the server validates (ValueError naming the field); the params are copied."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        order = []
        for prompt, p in zip(prompts, params_list):
            request_id = f"offline-{next(self._ids)}"
            [request] = self.processor.completion_requests([prompt], p, [request_id])
            self.engine.add_request(request)
            order.append(request_id)
        texts: dict[str, dict[int, list]] = {rid: {} for rid in order}
        results: dict[str, GenerationResult] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step().outputs:
                acc = texts[out.request_id]
                for delta in out.outputs:
                    text, ids, reason = acc.get(delta.index, ("", [], None))
                    acc[delta.index] = (text + delta.text, ids + delta.token_ids, delta.finish_reason or reason)
                if out.finished:
                    completions = [Completion(*acc[i]) for i in sorted(acc)]
                    results[out.request_id] = GenerationResult(out.request_id, out.prompt_token_ids,
                                                               completions, out.stats)
        return [results[rid] for rid in order]

