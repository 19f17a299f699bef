"""bench/gpu_e2e.py in its CPU smoke mode (tiny shape), so the GPU benchmark cannot rot between
the runs a lent device allows. Checks the table's bookkeeping, not speed."""
from __future__ import annotations

from sparse_serve.bench import gpu_e2e


def test_smoke_run_fills_every_row(tmp_path, capsys):
    out = tmp_path / "e2e.md"
    assert gpu_e2e.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--batches", "1", "3",
                         "--prompt-len", "12", "--gen-len", "6", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    variants = [r.split("|")[1].strip() for r in rows]
    assert variants == (["sparse"] * 2 + ["sparse-int8pred"] * 2 + ["eager"] * 2 + ["dense"] * 2
                        + ["transformers"] * 2)
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[4]) > 0                                           # byte floor
        # step ms; transformers' is a difference of two timings, which a busy host can swallow
        assert float(cells[2]) > 0 or (cells[0] == "transformers" and "too short to time" in cells[-1]), row
    dense_active = [float(r.split("|")[8]) for r in rows if "| dense |" in r]
    sparse_active = [float(r.split("|")[8]) for r in rows if "| sparse |" in r]
    assert max(sparse_active) < min(dense_active)                          # the predictor cut neurons
    int8_active = [float(r.split("|")[8]) for r in rows if "| sparse-int8pred |" in r]
    assert max(int8_active) < min(dense_active)                            # int8 copies predict too


def test_floor_counts_the_predictor_at_its_own_size():
    """1-byte predictor copies take (stored - 1) bytes per predictor weight off the floor."""
    import argparse

    import torch

    arch = gpu_e2e.shape_arch(gpu_e2e.SHAPES["mistral7b"], 400)
    args = argparse.Namespace(prompt_len=128, gen_len=256)
    ctx = gpu_e2e.Context(args, torch.device("cpu"), torch.bfloat16, arch, None, "", bandwidth=1e12)
    stored = gpu_e2e.floor_ms(ctx, 1, 0.1, with_predictor=True)
    int8 = gpu_e2e.floor_ms(ctx, 1, 0.1, with_predictor=True, predictor_bytes=1)
    predictor_weights = arch.num_layers * arch.predictor_rank * (arch.hidden_size + arch.intermediate_size)
    assert abs((stored - int8) - predictor_weights * (2 - 1) / 1e12 * 1e3) < 1e-9


def test_smoke_run_quantized(tmp_path):
    """`--quantization w8a8` (int8 weights, 8-bit activation grid) serves the sparse variant."""
    out = tmp_path / "e2e.md"
    assert gpu_e2e.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--batches", "1", "3",
                         "--prompt-len", "12", "--gen-len", "6", "--variants", "sparse", "--quantization", "w8a8",
                         "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| sparse |")]
    assert len(rows) == 2 and all(float(r.split("|")[3]) > 0 for r in rows)
