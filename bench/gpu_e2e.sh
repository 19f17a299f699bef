#!/usr/bin/env bash
# GPU check for served decode (issue 17), at most 6 minutes on an H100: the CUDA-graph tests
# (captured graphs give the eager tokens), then bench/gpu_e2e.py at TurboSparse-Mistral-7B's shape
# (sparse, eager, dense, transformers static-cache compiled; batch 1/4/16/64).
# Usage, from the repository root:  bash bench/gpu_e2e.sh [OUT_DIR]   (default docs/benchmarks)
# On a lent device machine: `bash bench/device_wheels.sh` here first, then run it there carrying .whl
# (bench/device_env.sh).
# Writes OUT_DIR/gpu_e2e.md. Every step runs even if an earlier one fails; the exit code is the
# first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-docs/benchmarks}
mkdir -p "$OUT_DIR"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# sparse_serve.* importable where it is not installed (a lent GPU machine), carried wheels installed
source bench/device_env.sh
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
status=0
step() { echo "== $1 ($(date -u +%H:%M:%S))"; shift; "$@" || { rc=$?; echo "!! failed: $rc"; [ $status -ne 0 ] || status=$rc; }; }

"$PY" -P -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
step "CUDA-graph decode tests" \
    timeout 90 "$PY" -P -m pytest -q -p no:cacheprovider tests/engine/test_decode_graphs.py tests/engine/test_engine_cuda.py
step "served decode at TurboSparse-Mistral-7B shape" \
    timeout 270 "$PY" -P bench/gpu_e2e.py --out "$OUT_DIR/gpu_e2e.md"
exit $status
