"""JSON-schema keywords xgrammar would silently ignore: those are a 400, never an answer that
looks constrained but is not (pure Python).

NOTE: the list was measured against xgrammar 0.2.9: for each keyword, a JSON text that breaks
it is still accepted by the grammar (tests/structured/test_grammar_units.py pins this, so an
upgrade that starts enforcing one shows up there).
Annotation keywords (title, description, default, examples, ...) are ignored on purpose.
"""
from __future__ import annotations

from typing import Any

# keyword -> why it cannot be honoured
_IGNORED = {
    "contains": "arrays that must contain a match",
    "minContains": "arrays that must contain a match",
    "maxContains": "arrays that must contain a match",
    "propertyNames": "constraints on property names",
    "dependentRequired": "conditional requirements",
    "dependentSchemas": "conditional schemas",
    "dependencies": "conditional requirements",
    "if": "conditional schemas",
    "then": "conditional schemas",
    "else": "conditional schemas",
    "not": "negated schemas",
    "unevaluatedProperties": "unevaluatedProperties",
}
# keywords whose value is one subschema / a list of them / a map of them
_ONE = ("items", "additionalProperties", "additionalItems", "contains", "propertyNames", "not",
        "if", "then", "else", "unevaluatedProperties", "unevaluatedItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def find_unsupported(schema: Any, path: str = "#") -> tuple[str, str, str] | None:
    """(JSON pointer, keyword, why) of the first keyword the grammar cannot enforce, or None."""
    if not isinstance(schema, dict):
        return None
    for keyword, why in _IGNORED.items():
        if keyword in schema:
            return path, keyword, why
    if schema.get("uniqueItems") is True:
        return path, "uniqueItems", "arrays of unique items"
    if "multipleOf" in schema and schema.get("type") != "integer":
        return path, "multipleOf", "multipleOf on non-integer numbers"
    if len(schema.get("allOf") or ()) > 1:
        return path, "allOf", "allOf with more than one subschema"
    for key in _ONE:
        found = find_unsupported(schema.get(key), f"{path}/{key}")
        if found:
            return found
    for key in _LIST:
        value = schema.get(key)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                found = find_unsupported(sub, f"{path}/{key}/{i}")
                if found:
                    return found
    for key in _MAP:
        value = schema.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                found = find_unsupported(sub, f"{path}/{key}/{name}")
                if found:
                    return found
    return None
