"""Offline tools: calibrated thresholds for SwiGLU models, their text, and perplexity."""
