#!/usr/bin/env bash
# GPU check for the kernels (issue 5): on a CUDA host, run the kernel tests with the compiled
# Triton kernels (no interpreter), then the GPU benchmark (bf16, Mistral-7B FFN shape), in
# well under 5 minutes. Usage, from the repository root:  bash bench/gpu_check.sh
# Writes docs/benchmarks/kernels_gpu.md. Exits non-zero if the tests fail.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is for GPU hosts"
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
PYEOF

# NOTE: TRITON_INTERPRET=0 makes tests/kernels/conftest.py leave the compiled kernels on.
echo "== kernel tests (compiled Triton, CUDA tensors)"
TRITON_INTERPRET=0 timeout 240 "$PY" -m pytest -q tests/kernels -p no:cacheprovider

echo "== GPU benchmark: bf16, batch 1/4/16, sparsity 0/50/80/90/95%"
TRITON_INTERPRET=0 timeout 180 "$PY" bench/kernels.py --device cuda --dtypes bf16 \
    --out docs/benchmarks/kernels_gpu.md
echo "== wrote docs/benchmarks/kernels_gpu.md"
echo "targets (issue 5): batch 1 at 90% sparsity >= 6x cuBLAS dense and >= 60% of the copy ceiling"
