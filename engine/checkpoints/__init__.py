"""Checkpoints on disk: the safetensors loader, GGUF conversion, the embedded default model and
the calibrated-sparsity sidecar file."""
