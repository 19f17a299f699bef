"""Constrained decoding inside the engine (tiny random checkpoint, CPU, offline LLM): every
answer matches its grammar, free requests in a mixed batch are untouched, preemption and abort
leave the matcher state right, n > 1 siblings each follow the grammar."""
from __future__ import annotations

import json
import re

import pytest

from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.structured.params import StructuredOutputs

GREEDY = dict(temperature=0.0)
SCHEMA = {"type": "object", "properties": {
    "label": {"type": "string", "enum": ["red", "green", "blue"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 999},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3}},
    "required": ["label", "count", "tags"]}
JSON_SCHEMA = StructuredOutputs.json_schema(SCHEMA, "response_format.json_schema.schema")
REGEX = StructuredOutputs("regex", "(cat|dog)-[0-9]{2}", "structured_outputs.regex")
PROMPTS = ["The capital of France is", "Hello world, hello", "Neurons that are silent"]


def make_llm(path, **overrides) -> LLM:
    # NOTE: a small KV cache: the default 1 GiB takes seconds to zero on this machine.
    return LLM(str(path), **{"model.sparse_kernels": False, "cache.kv_cache_bytes": 8 << 20, **overrides})


def check_schema_answer(text: str) -> None:
    value = json.loads(text, strict=False)
    assert list(value) == ["label", "count", "tags"]        # schema order
    assert value["label"] in ("red", "green", "blue")
    assert 0 <= value["count"] <= 999
    assert len(value["tags"]) <= 3 and all(len(t) <= 4 for t in value["tags"])


def test_constrained_answers_match_and_stop(roomy_model_dir):
    llm = make_llm(roomy_model_dir)
    results = llm.generate(PROMPTS, SamplingParams(max_tokens=80, structured=JSON_SCHEMA, **GREEDY))
    for result in results:
        completion = result.completions[0]
        assert completion.finish_reason == "stop", completion.text
        check_schema_answer(completion.text)
        assert completion.token_ids[-1] in llm.engine.eos_token_ids   # grammar complete -> EOS
    regex = llm.generate(PROMPTS, SamplingParams(max_tokens=20, structured=REGEX, temperature=1.0, seed=3))
    for result in regex:
        assert re.fullmatch(r"(cat|dog)-[0-9]{2}", result.completions[0].text)


def test_free_requests_in_a_mixed_batch_are_untouched(roomy_model_dir):
    llm = make_llm(roomy_model_dir)
    free = SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY)
    seeded = SamplingParams(max_tokens=24, ignore_eos=True, temperature=1.0, seed=7)
    alone = [llm.generate([PROMPTS[0]], free)[0], llm.generate([PROMPTS[1]], seeded)[0]]
    constrained = SamplingParams(max_tokens=80, structured=JSON_SCHEMA, **GREEDY)
    mixed = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[2]], [free, constrained, seeded, constrained])
    assert mixed[0].completions[0].token_ids == alone[0].completions[0].token_ids
    assert mixed[2].completions[0].token_ids == alone[1].completions[0].token_ids
    check_schema_answer(mixed[1].completions[0].text)


def test_preemption_keeps_the_matcher_right(roomy_model_dir):
    params = SamplingParams(max_tokens=80, structured=JSON_SCHEMA, **GREEDY)
    batch = PROMPTS * 2
    roomy = make_llm(roomy_model_dir).generate(batch, params)
    tight = make_llm(roomy_model_dir, **{"cache.num_blocks": 30, "cache.block_size": 4})
    cramped = tight.generate(batch, params)
    assert tight.engine.scheduler.num_preemptions > 0
    for a, b in zip(roomy, cramped):
        assert b.completions[0].token_ids == a.completions[0].token_ids
        check_schema_answer(b.completions[0].text)


def test_abort_mid_request_releases_and_others_go_on(roomy_model_dir):
    llm = make_llm(roomy_model_dir)
    params = SamplingParams(max_tokens=80, structured=JSON_SCHEMA, **GREEDY)
    [first] = llm.processor.completion_requests([PROMPTS[0]], params, ["a"])
    [second] = llm.processor.completion_requests([PROMPTS[1]], params, ["b"])
    engine = llm.engine
    engine.add_request(first)
    engine.add_request(second)
    seqs = {rid: engine.requests[rid].seqs[0] for rid in ("a", "b")}
    for _ in range(5):
        engine.step()
    assert seqs["a"].grammar_state is not None and seqs["a"].grammar_state.num_accepted > 0
    engine.abort_request("a")
    assert seqs["a"].grammar_state is None                 # released with the sequence
    text = ""
    while engine.has_unfinished():
        for out in engine.step().outputs:
            text += "".join(d.text for d in out.outputs)
    assert seqs["b"].grammar_state is None and seqs["b"].finish_reason == "stop"
    full = llm.generate([PROMPTS[1]], params)[0].completions[0].text
    assert full.endswith(text) and text
    check_schema_answer(full)


def test_siblings_get_their_own_matchers(roomy_model_dir):
    llm = make_llm(roomy_model_dir)
    result = llm.generate([PROMPTS[0]], SamplingParams(n=4, max_tokens=80, temperature=1.0, seed=11,
                                                        structured=JSON_SCHEMA))[0]
    texts = [c.text for c in result.completions]
    for text in texts:
        check_schema_answer(text)
    assert len(set(texts)) > 1     # seeded siblings differ, each within the grammar


@pytest.mark.parametrize("field, value", [("ignore_eos", True), ("min_tokens", 2)])
def test_eos_bans_cannot_combine_with_a_grammar(roomy_model_dir, field, value):
    llm = make_llm(roomy_model_dir)
    with pytest.raises(ValueError, match=field):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, structured=REGEX, **{field: value}))
