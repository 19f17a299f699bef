"""The Triton paths run through Triton's interpreter on the CPU (set before any kernel module is
imported, as in tests/kernels/conftest.py); on a GPU host they run compiled on CUDA tensors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
