"""Text in and out: the tokenizer with its sandboxed chat templates, incremental detokenization."""
