#!/usr/bin/env bash
# GPU check for the kernels (issue 5), in about 5 minutes on a CUDA host: the tile sweep of
# the Triton kernels at batch 1, then the bf16 benchmark at Mistral-7B FFN shape (with the
# predictor at rank 1024) on the tiles the sweep chose, predictor + FFN timed as one call
# against the dense FFN, exact mode (no predictor), the paged-attention tiles, and last the
# kernel tests and the CUDA engine tests with compiled Triton kernels (no interpreter).
# Measurements first: a run cut short by a device lease keeps them (each step has a timeout).
# Usage, from the repository root:
#   bash bench/gpu_check.sh [OUT_DIR]
# On a lent device machine: `bash bench/device_wheels.sh` here first, then run it there carrying .whl
# (bench/device_env.sh).
# TUNE_BATCHES="1 4" also sweeps the tl.dot tiles of 4-8 rows (a few minutes more);
# TUNE_SWEEP="predictor" (of: compact exact predictor) narrows the sweep.
# Writes OUT_DIR/tuned.json, OUT_DIR/kernels_gpu.md, OUT_DIR/predicted_layer_gpu.md,
# OUT_DIR/kernels_gpu_exact.md, OUT_DIR/paged_attention_gpu.md (default docs/benchmarks) and,
# where Nsight Compute is installed, OUT_DIR/ncu_ffn.csv.
# Every step runs even if an earlier one fails; the exit code is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-docs/benchmarks}
mkdir -p "$OUT_DIR"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# sparse_serve.* importable where it is not installed (a lent GPU machine), carried wheels installed
source bench/device_env.sh
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0   # conftest leaves compiled kernels on
status=0
step() { echo "== $1 ($(date -u +%H:%M:%S))"; shift; "$@" || { rc=$?; echo "!! failed: $rc"; [ $status -ne 0 ] || status=$rc; }; }

"$PY" - <<'PYEOF' || exit 1
import torch, triton
assert torch.cuda.is_available(), "no CUDA device: this script is for GPU hosts"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
PYEOF
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || true)

step "tile sweep of the Triton FFN and predictor kernels (batch ${TUNE_BATCHES:-1}; 90%)" \
    timeout 240 "$PY" bench/tune_triton_ffn.py --batches ${TUNE_BATCHES:-1} --sweep ${TUNE_SWEEP:-compact exact predictor} --json "$OUT_DIR/tuned.json"
CONFIGS=$([ -f "$OUT_DIR/tuned.json" ] && echo "--configs $OUT_DIR/tuned.json" || true)
step "benchmark: bf16, batch 1/2/4/8/16, sparsity 0/50/80/90/95%, predictor rank 1024 $CONFIGS" \
    timeout 120 "$PY" bench/ffn_kernels.py --device cuda --dtypes bf16 --predictor-rank 1024 --batches 1 2 4 8 16 \
    $CONFIGS --out "$OUT_DIR/kernels_gpu.md"
step "predictor + FFN as one call (one CUDA-graph replay) vs the dense FFN" \
    timeout 60 "$PY" bench/predicted_layer.py $CONFIGS --out "$OUT_DIR/predicted_layer_gpu.md"
step "benchmark, exact mode (no predictor): bf16, batch 1/4/8" \
    timeout 60 "$PY" bench/ffn_kernels.py --device cuda --dtypes bf16 --mode exact --batches 1 4 8 \
    $CONFIGS --out "$OUT_DIR/kernels_gpu_exact.md"
step "benchmark: paged-attention decode tiles (bf16, Mistral heads) vs the torch path" \
    timeout 60 "$PY" bench/paged_attention.py --out "$OUT_DIR/paged_attention_gpu.md"
step "kernel + CUDA engine tests (compiled Triton, CUDA tensors)" \
    timeout 210 "$PY" -P -m pytest -q $XDIST -p no:cacheprovider tests/kernels tests/engine/test_engine_cuda.py
# Nsight Compute on the FFN's kernels at batch 1 (two rounds after a compiling one, each from the
# mask alone, 3 launches, then from the mask and the group counts, 2: skip 5, profile 10; see
# bench/ffn_kernel_calls.py): DRAM throughput, occupancy and warp stalls per kernel, what the
# next change should aim at.
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
    step "ncu: the FFN kernels at batch 1, 90% (-> $OUT_DIR/ncu_ffn.csv)" \
        timeout 120 "$NCU" --clock-control none --csv --log-file "$OUT_DIR/ncu_ffn.csv" \
        --kernel-name regex:'_compact_kernel|_gate_up_kernel|_gate_up_counted_kernel|_down_kernel' \
        --launch-skip 5 --launch-count 10 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section LaunchStats "$PY" bench/ffn_kernel_calls.py $CONFIGS
fi
echo "targets (issue 5): batch 1 at 90% sparsity >= 6x cuBLAS dense and >= 60% of the copy ceiling"
for table in kernels_gpu kernels_gpu_exact; do   # the batch-1, 90% rows, to compare at a glance
    [ -f "$OUT_DIR/$table.md" ] && grep -E '^\| cuda \| bf16 \| 1 \| 90% ' "$OUT_DIR/$table.md" | sed "s/^/$table: /"
done
[ -f "$OUT_DIR/predicted_layer_gpu.md" ] && grep -E '^\| 1 \| 90% ' "$OUT_DIR/predicted_layer_gpu.md" \
    | sed "s/^/predicted layer (batch, sparsity, union, dense ms, predictor + FFN ms, speed-up): /"
echo "gpu_check took ${SECONDS} s (first failure's exit code: $status)"
exit $status
