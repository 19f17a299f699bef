"""Every Triton kernel launch compiles for the GPUs we deploy on, without a GPU.

bench/compile_check.py records the launchers' real launches (Mistral-7B shapes, bf16 and fp32,
decode batches, the tuner's layout variants, paged attention) and compiles each with Triton's
compiler and bundled ptxas. The interpreter the other kernel tests use accepts code the compiler
rejects, and never checks shared memory: both are caught here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build has no bundled ptxas")
def test_every_kernel_launch_compiles_within_shared_memory():
    # sm_90: H100/H200; sm_89: L4/L40S/RTX 4090, the smallest shared memory (99 KiB).
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "bench/compile_check.py", "--arch", "90", "89"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = result.stdout + result.stderr[-2000:]
    assert result.returncode == 0, report[-4000:]
    assert "FAILED" not in report
    # Every kernel family was compiled, for both targets.
    for kernel in ("_compact_kernel", "_gate_up_kernel", "_gate_pass_kernel", "_down_kernel",
                   "_reduce_kernel", "_linear_epilogue_kernel", "_paged_attention_decode_kernel",
                   "_paged_attention_reduce_kernel"):
        assert report.count(f"| {kernel} |") >= 2, kernel
    assert "## sm_90" in report and "## sm_89" in report
