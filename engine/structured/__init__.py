"""Structured outputs: grammar-constrained decoding with xgrammar.

- `params`: what a request asks for (JSON schema, json_object, regex, choice, EBNF), pure data.
- `compiler`: compiles that into an xgrammar CompiledGrammar, off the engine's step thread,
  cached by the spec's hash (the server's processor awaits it before the engine sees the request).
- `bitmask`: per-sequence matchers and the step-time hook that masks the logits of constrained
  rows before sampling (the model runner's one call).

Only `compiler` and `bitmask` import xgrammar; `params` is safe for the pure-Python engine core.
"""
