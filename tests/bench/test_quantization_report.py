"""bench/quantization.py's report: every quantized variant gets its quality row per setting and its
speed columns, with deltas and speed-ups computed against fp32 (synthetic measurements)."""
from types import SimpleNamespace

from sparse_serve.bench.quantization import PROMPTS, VARIANTS, Setting, report


def _setting(name: str, with_speed: bool) -> Setting:
    s = Setting(name, None)
    s.ppl = {None: 20.0, "int8": 20.1, "w8a8": 20.4}
    ref = [[1, 2, 3, 4]] * len(PROMPTS)
    s.tokens = {None: ref, "int8": ref, "w8a8": [[1, 2, 9, 9]] + ref[1:]}
    if with_speed:
        for batch, base in ((1, 40.0), (16, 100.0)):
            s.step_ms[(None, batch)] = [base] * 4
            s.step_ms[("int8", batch)] = [base / 4] * 4
            s.step_ms[("w8a8", batch)] = [base / 5] * 4
    return s


def test_report_has_a_row_per_setting_and_variant():
    args = SimpleNamespace(windows=2, window=16, agree_tokens=4, output_len=8, rounds=1,
                           variants=(None, "int8", "w8a8"))   # what `--methods int8 w8a8` asks
    info = {"model": "m", "command": "c", "load_before": (0, 0, 0), "load_after": (0, 0, 0)}
    text = report([_setting("dense", False), _setting("served", True)], args, info)
    assert VARIANTS == (None, "int8", "w8a8", "int4", "w4a8")   # the default: every method
    assert text.startswith("# Quantized weights (`--quantization int8 / w8a8`) vs fp32")
    assert "| dense | int8 | 20.000 | 20.100 | +0.50% | 5/5 | 100% | 100% |" in text
    assert "| served | w8a8 | 20.000 | 20.400 | +2.00% | 4/5 | 90% | 90% |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 16 |")]
    assert len(rows) == 1
    assert "| 25.00 (25.00-25.00) | 4.00x |" in rows[0] and "| 20.00 (20.00-20.00) | 5.00x |" in rows[0]
    assert rows[0].endswith("| 160.0 / 640.0 / 800.0 |")
