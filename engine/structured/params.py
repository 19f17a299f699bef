"""What a request asks its output to match (pure Python: no torch, no xgrammar).

One `StructuredOutputs` per request, built by the server from `response_format`, the
vLLM-style `structured_outputs` extra, or a forced tool choice. `value` holds the canonical text
the compiler reads (a JSON schema as JSON text, a regex, an EBNF grammar, a JSON list of
choices), so equal requests hash equally and share a compiled grammar.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# kind -> what `value` holds
KINDS = {
    "json_schema": "a JSON schema (canonical JSON text)",
    "json_object": "nothing: any JSON object",
    "regex": "a regular expression",
    "choice": "a JSON list of the allowed strings",
    "grammar": "an EBNF grammar (xgrammar's GBNF dialect)",
}


@dataclass(frozen=True)
class StructuredOutputs:
    kind: str
    value: str = ""
    # Where the request asked for it (for error messages): "response_format",
    # "structured_outputs.json", "tool_choice", ...
    source: str = "response_format"
    # The metrics label: what the client asked for (a forced tool call is "tool_call" even
    # though it compiles to a json_schema).
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown structured output kind {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: Any, source: str, label: str = "json_schema") -> "StructuredOutputs":
        # NOTE: keys keep their order: the grammar writes properties in schema order.
        return cls("json_schema", json.dumps(schema, ensure_ascii=False), source, label)

    @property
    def metric_kind(self) -> str:
        return self.label or self.kind

    @property
    def cache_key(self) -> str:
        """sha256 of kind and value: the compiled-grammar cache key."""
        return hashlib.sha256(f"{self.kind}\0{self.value}".encode()).hexdigest()
