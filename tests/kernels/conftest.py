"""Kernel tests run every Triton kernel on the CPU through Triton's interpreter.

NOTE: triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is
imported; kernels/ imports its Triton modules lazily, so setting the variable here (before any
test module imports them) is enough. On a GPU host bench/gpu_check.sh sets TRITON_INTERPRET=0
and the same tests run the compiled kernels on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
