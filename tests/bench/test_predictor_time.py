"""bench/predictor_precision.py --time runs (tiny shapes): both variants timed and reported."""
import re

import pytest

from sparse_serve.bench.predictor_precision import time_predictor
from sparse_serve.kernels import cpu_native


@pytest.mark.skipif(not cpu_native.available(), reason="native CPU kernels did not build")
def test_time_predictor_reports_both_variants():
    line = time_predictor(hidden=64, neurons=96, rank=16, layers=2, repeats=2)
    times = re.findall(r"(bf16|int8) ([0-9.]+) ms", line)
    assert [name for name, _ in times] == ["bf16", "int8"] and all(float(ms) > 0 for _, ms in times), line
