"""bench/paged_attention_cpu.py runs end to end on tiny cases, one layer and several (cold caches)."""
from __future__ import annotations

import re

import pytest

from sparse_serve.bench import paged_attention_cpu as bench
from sparse_serve.kernels import cpu_native

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="the native CPU kernels did not build")


@pytest.mark.parametrize("layers", [1, 3])
def test_report_has_a_row_per_case(tmp_path, layers):
    out = tmp_path / "report.md"
    assert bench.main(["--heads", "smollm2", "--seqs", "2", "--contexts", "20", "--repeats", "2",
                       "--layers", str(layers), "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| smollm2 |")]
    assert len(rows) == 2                                      # float32 and bfloat16
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        native, gather, speedup = float(cells[4]), float(cells[5]), cells[6]
        assert native > 0 and gather > 0 and re.fullmatch(r"[0-9.]+x", speedup), row
    assert ("per layer" in text) == (layers > 1)
