"""Sparse-activation kernels: sparse FFN, activation predictor, paged-attention decode.

The entry points are `sparse_ffn.sparse_ffn`, `sparse_ffn.predict_active` and
`paged_attention.paged_attention_decode`. Each dispatches CUDA tensors to a Triton kernel and CPU
tensors to the best CPU path (the one switch: kernels/dispatch.py); a pure-torch reference sits
beside each kernel (`*_ref.py`). Triton modules are imported lazily, so importing an entry point
never imports Triton.

NOTE: the package itself imports nothing, so that torch-free modules (`activations`, `cache`)
can be imported by the engine's pure-Python config without pulling in torch.
"""
