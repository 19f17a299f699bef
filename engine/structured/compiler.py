"""Compiling StructuredOutputs into xgrammar grammars, off the engine's step thread.

One `GrammarCompiler` per input processor. `compile()` is a coroutine: the work runs on this
object's own thread, so neither the event loop, the engine step nor the processor's tokenizer
thread waits for a compile (a large schema can take seconds). Compiled grammars are cached by
the spec's sha256 (an LRU of `cache_size` entries); xgrammar's own cache is off so this one is
the only one and its hits can be counted.

A spec that cannot compile raises ValueError naming the request field (the server's 400).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sparse_serve.engine.structured.params import StructuredOutputs
from sparse_serve.engine.structured.schema_check import find_unsupported

logger = logging.getLogger(__name__)

# xgrammar prefixes its messages with "[hh:mm:ss] /path/file.cc:123: "; clients need the rest.
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar plus what a matcher needs to run it (shared by every sequence)."""
    compiled: Any                  # xgrammar.CompiledGrammar
    stop_token_ids: tuple[int, ...]
    vocab_size: int                # the tokenizer's; logits columns past it are never allowed
    spec: StructuredOutputs


@dataclass(frozen=True)
class CompileResult:
    grammar: Grammar
    seconds: float                 # compile time (0 for a cache hit)
    cached: bool


class GrammarCompiler:
    def __init__(self, hf_tokenizer: Any, stop_token_ids: set[int], cache_size: int = 256):
        self._hf = hf_tokenizer
        self.stop_token_ids = tuple(sorted(stop_token_ids))
        self.vocab_size = len(hf_tokenizer)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler = None      # built on first use: the tokenizer scan takes ~0.2 s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compiler")
        self.num_compiles = 0
        self.num_cache_hits = 0

    async def compile(self, spec: StructuredOutputs) -> CompileResult:
        # NOTE: a cache hit is answered in place: a hop to the compile thread would delay the
        # request past the engine step it could have joined.
        hit = self._lookup(spec.cache_key)
        if hit is not None:
            return hit
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.compile_now, spec)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def compile_now(self, spec: StructuredOutputs) -> CompileResult:
        """Synchronous compile (the offline LLM and the executor call this)."""
        key = spec.cache_key
        hit = self._lookup(key)
        if hit is not None:
            return hit
        started = time.perf_counter()
        compiled = self._compile(spec)
        seconds = time.perf_counter() - started
        grammar = Grammar(compiled, self.stop_token_ids, self.vocab_size, spec)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self.num_compiles += 1
        logger.debug("compiled a %s grammar in %.1f ms", spec.kind, seconds * 1e3)
        return CompileResult(grammar, seconds, False)

    def _lookup(self, key: str) -> CompileResult | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                return None
            self._cache.move_to_end(key)
            self.num_cache_hits += 1
            return CompileResult(hit, 0.0, True)

    # ---- xgrammar -------------------------------------------------------------------------
    def _xgr_compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self._hf, vocab_size=self.vocab_size,
                                                      stop_token_ids=list(self.stop_token_ids))
            threads = max(1, min(8, os.cpu_count() or 1))
            self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        return self._compiler

    def _compile(self, spec: StructuredOutputs):
        compiler = self._xgr_compiler()
        kind, value = spec.kind, spec.value
        if kind == "json_schema":
            schema = json.loads(value)
            found = find_unsupported(schema)
            if found is not None:
                pointer, keyword, why = found
                raise ValueError(f"Invalid value for '{spec.source}': the JSON schema keyword "
                                 f"'{keyword}' (at {pointer}) is not supported: the grammar engine "
                                 f"cannot enforce {why}")
        try:
            if kind == "json_schema":
                # NOTE: compact JSON (no free whitespace): small models otherwise loop on
                # whitespace, and the answer is the same JSON.
                return compiler.compile_json_schema(value, any_whitespace=False, strict_mode=True)
            if kind == "json_object":
                # NOTE: any object, written compactly (the builtin JSON grammar allows free
                # whitespace, which small models fill forever).
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                    strict_mode=False)
            if kind == "regex":
                return compiler.compile_regex(value)
            if kind == "choice":
                choices = json.loads(value)
                rule = " | ".join(_ebnf_literal(c) for c in choices)
                return compiler.compile_grammar(f"root ::= {rule}")
            return compiler.compile_grammar(value)
        except (RuntimeError, ValueError) as exc:
            message = _XGRAMMAR_PREFIX.sub("", str(exc).strip()).splitlines()[0]
            raise ValueError(f"Invalid value for '{spec.source}': it cannot be compiled into a "
                             f"grammar: {message}") from None


def _ebnf_literal(text: str) -> str:
    """A string literal for xgrammar's EBNF: JSON's escapes are the ones it reads."""
    return json.dumps(text, ensure_ascii=False)
