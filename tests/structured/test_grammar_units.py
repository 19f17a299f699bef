"""engine/structured on its own: compile cache and thread, the unsupported-keyword list against
xgrammar itself, and the bitmask hook (rows, padding, rollback, a finished grammar)."""
from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest
import torch
import xgrammar as xgr

from sparse_serve.engine.structured.bitmask import GrammarState, apply_grammar_bitmasks
from sparse_serve.engine.structured.compiler import GrammarCompiler
from sparse_serve.engine.structured.params import StructuredOutputs
from sparse_serve.engine.structured.schema_check import _IGNORED, find_unsupported
from sparse_serve.engine.text.tokenizer import Tokenizer

EOS = 1


@pytest.fixture(scope="module")
def tokenizer(roomy_model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(str(roomy_model_dir))


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer.hf, {EOS})


def regex(pattern: str) -> StructuredOutputs:
    return StructuredOutputs("regex", pattern, "structured_outputs.regex")


def test_compiles_on_its_own_thread_and_caches_by_spec(compiler):
    seen = []
    original = compiler._compile

    def spy(spec):
        seen.append(threading.current_thread().name)
        return original(spec)

    compiler._compile = spy
    try:
        first = asyncio.run(compiler.compile(regex("[a-c]{2}x")))
        second = asyncio.run(compiler.compile(regex("[a-c]{2}x")))
    finally:
        compiler._compile = original
    assert seen and all(name.startswith("grammar-compiler") for name in seen)
    assert len(seen) == 1 and not first.cached and second.cached
    assert second.grammar is first.grammar and second.seconds == 0.0


def test_cache_is_bounded(tokenizer):
    small = GrammarCompiler(tokenizer.hf, {EOS}, cache_size=2)
    for pattern in ("a", "b", "c"):
        small.compile_now(regex(pattern))
    assert not small.compile_now(regex("a")).cached      # evicted (least recently used)
    assert small.compile_now(regex("c")).cached


OBJ = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
ARR = {"type": "array", "items": {"type": "integer"}}
# keyword -> (schema using it, a JSON text that breaks it)
VIOLATIONS = {
    "contains": ({**ARR, "contains": {"const": 1}}, "[3]"),
    "minContains": ({**ARR, "contains": {"const": 1}, "minContains": 2}, "[3, 4]"),
    "maxContains": ({**ARR, "contains": {"const": 1}, "maxContains": 1}, "[1, 1]"),
    "propertyNames": ({**OBJ, "propertyNames": {"pattern": "^b"}}, '{"a": 1}'),
    "dependentRequired": ({**OBJ, "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    "dependentSchemas": ({**OBJ, "dependentSchemas": {"a": {"required": ["b"]}}}, '{"a": 1}'),
    "dependencies": ({**OBJ, "dependencies": {"a": ["b"]}}, '{"a": 1}'),
    "if": ({**OBJ, "if": {"required": ["a"]}, "then": {"required": ["b"]}}, '{"a": 1}'),
    "then": ({**OBJ, "if": {"required": ["a"]}, "then": {"required": ["b"]}}, '{"a": 1}'),
    "else": ({**OBJ, "if": {"required": ["a"]}, "else": {"required": ["b"]}}, "{}"),
    "not": ({**OBJ, "not": {"required": ["a"]}}, '{"a": 1}'),
    "unevaluatedProperties": ({"type": "object", "additionalProperties": True,
                               "unevaluatedProperties": False}, '{"z": 1}'),
}


@pytest.mark.parametrize("keyword", sorted(_IGNORED))
def test_rejected_keywords_are_ones_xgrammar_does_not_enforce(keyword):
    """The list is not a guess: xgrammar accepts a text that breaks each keyword (re-measure
    when upgrading xgrammar), so a schema using one is a 400 naming it."""
    from xgrammar.testing import _is_grammar_accept_string

    schema, text = VIOLATIONS[keyword]
    assert _is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False), text)
    pointer, found, why = find_unsupported({"type": "object", "properties": {"x": schema}})
    assert pointer == "#/properties/x" and found in schema and why == _IGNORED[found]


def test_supported_schemas_pass_the_check():
    from pydantic import BaseModel, Field

    class Inner(BaseModel):
        tags: list[str] = Field(max_length=3)

    class Outer(BaseModel):
        score: float = Field(ge=0, le=1)
        inner: Inner | None = None

    assert find_unsupported(Outer.model_json_schema()) is None


def seq(grammar, output: list[int]):
    return SimpleNamespace(params=SimpleNamespace(grammar=grammar), output_token_ids=output, grammar_state=None)


def allowed(logits: torch.Tensor, row: int) -> set[int]:
    return set(torch.nonzero(logits[row] > float("-inf")).flatten().tolist())


def test_bitmask_masks_constrained_rows_only_and_padding(compiler, tokenizer):
    grammar = compiler.compile_now(regex("ab")).grammar
    width = tokenizer.vocab_size + 13                          # a padded embedding
    logits = torch.randn(3, width)
    free_row = logits[1].clone()
    seqs = [seq(grammar, []), SimpleNamespace(params=SimpleNamespace(grammar=None), output_token_ids=[]),
            seq(grammar, tokenizer.encode("a", add_special_tokens=False))]
    apply_grammar_bitmasks(logits, seqs)
    assert torch.equal(logits[1], free_row)
    texts = {tokenizer.decode([t]) for t in allowed(logits, 0)}
    assert texts and all("ab".startswith(t) for t in texts)
    assert {tokenizer.decode([t]) for t in allowed(logits, 2)} == {"b"}
    assert not allowed(logits, 0) & set(range(tokenizer.vocab_size, width))


def test_finished_grammar_allows_only_eos_and_rollback_follows_the_tokens(compiler, tokenizer):
    grammar = compiler.compile_now(regex("ab")).grammar
    ids = tokenizer.encode("ab", add_special_tokens=False)
    s = seq(grammar, list(ids))
    logits = torch.zeros(1, tokenizer.vocab_size)
    apply_grammar_bitmasks(logits, [s])
    assert allowed(logits, 0) == {EOS}
    state: GrammarState = s.grammar_state
    assert state.num_accepted == len(ids)
    s.output_token_ids = ids[:1] if len(ids) > 1 else []     # fewer tokens than accepted: roll back
    logits = torch.zeros(1, tokenizer.vocab_size)
    apply_grammar_bitmasks(logits, [s])
    assert state.num_accepted == len(s.output_token_ids)
    assert EOS not in allowed(logits, 0)


def test_a_refused_token_ends_the_sequence_with_eos(compiler, tokenizer):
    grammar = compiler.compile_now(regex("ab")).grammar
    s = seq(grammar, tokenizer.encode("zz", add_special_tokens=False))
    logits = torch.zeros(1, tokenizer.vocab_size)
    apply_grammar_bitmasks(logits, [s])
    assert s.grammar_state.broken and allowed(logits, 0) == {EOS}
