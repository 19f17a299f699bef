"""bench/predicted_layer.py (predictor + FFN as one call; gpu_check.sh runs it) on a small layer
(under the Triton interpreter on the CPU, compiled on a GPU)."""

import pytest

pytest.importorskip("triton")

from sparse_serve.bench import predicted_layer  # noqa: E402
from tests.kernels.kernel_cases import triton_device  # noqa: E402


def test_times_the_layer_and_dense_and_writes_its_table(tmp_path):
    out = tmp_path / "layer.md"
    predicted_layer.main(["--device", triton_device(), "--hidden", "64", "--intermediate", "384",
                          "--rank", "16", "--batches", "1", "2", "--sparsities", "0.9",
                          "--repeats", "1", "--out", str(out)])
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 1 ")
            or line.startswith("| 2 ")]
    assert len(rows) == 2
    # one time a row for the layer (gpu_check.sh's summary reads these columns)
    assert "| batch | sparsity | union | dense ms | predictor + FFN ms | speed-up |" in table
    assert all(len(row.strip("|").split("|")) == 6 for row in rows), rows
    # the predictor's threshold gives the sparsity asked for: one row reads ~10% of the neurons
    union = float(rows[0].split("|")[3].strip().rstrip("%"))
    assert 5 <= union <= 15, rows[0]
