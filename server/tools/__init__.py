"""Tool calling: request checks and the prompt (`prompt`), the grammar for forced calls and the
answer's `tool_calls` (`calls`), and the per-family parsers of a model's own call format for
`tool_choice: "auto"` (`parsers`, chosen with --tool-call-parser)."""
