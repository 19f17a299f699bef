"""Calibrated SwiGLU sparsity on a tiny random checkpoint: targets are hit (as the model's own
activity counts measure them), the greedy search allocates by sensitivity, the sidecar round-trips
and the loader applies it or refuses a mismatch, and the CLI writes a file."""
from __future__ import annotations

import json

import pytest

from sparse_serve.engine.calibration.calibrate import (
    Calibrator,
    calibrate,
    greedy_allocation,
    main_calibrate,
    scale_factor,
    scale_table,
)
from sparse_serve.engine.calibration.calibration_data import load_windows, stdlib_docstrings, token_windows
from sparse_serve.engine.calibration.perplexity import evaluate
from sparse_serve.engine.checkpoints.loader import load_model
from sparse_serve.engine.checkpoints.sparsity_file import SparsityFile, read_sparsity_file, write_sparsity_file
from sparse_serve.engine.core.config import ModelConfig
from sparse_serve.engine.core.errors import ModelLoadError
from sparse_serve.engine.text.tokenizer import Tokenizer
from tests.tiny_checkpoint import make_tiny_checkpoint

WINDOW = 64


@pytest.fixture(scope="module")
def silu_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("silu") / "model", "silu", num_layers=3)


@pytest.fixture(scope="module")
def tiny(silu_checkpoint):
    model, _ = load_model(ModelConfig(path=str(silu_checkpoint), dtype="float32", device="cpu"),
                          silu_checkpoint)
    tokenizer = Tokenizer.from_pretrained(str(silu_checkpoint))
    calib = load_windows(tokenizer, "calibration", WINDOW, 8)
    heldout = load_windows(tokenizer, "heldout", WINDOW, 8)
    return model, calib, heldout


def test_calibration_and_heldout_texts_are_disjoint_and_deterministic():
    calib, heldout = stdlib_docstrings("calibration"), stdlib_docstrings("heldout")
    assert len(calib) > 100 and len(heldout) > 30
    assert not set(calib) & set(heldout)
    assert calib == stdlib_docstrings("calibration")


def test_token_windows_cut_fixed_lengths_with_bos():
    windows = token_windows(lambda t: list(range(len(t))), ["x" * 10, "y" * 20], 5, 3, bos_token_id=7)
    assert [len(w) for w in windows] == [5, 5, 5]
    assert all(int(w[0]) == 7 for w in windows)


@pytest.mark.parametrize("method", ["uniform", "greedy"])
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_measured_sparsity_hits_target(tiny, method, target):
    model, calib, heldout = tiny
    sidecar = calibrate(model, calib, target, method, step=0.1, error_windows=2)
    layer_targets = sidecar.calibration["layer_targets"]
    assert sum(layer_targets) / len(layer_targets) == pytest.approx(target, abs=1e-9)
    # The model's own activity counts, through SparsityAccounting, on calibration and held-out text.
    assert evaluate(model, calib).sparsity == pytest.approx(target, abs=0.02)
    assert evaluate(model, heldout).sparsity == pytest.approx(target, abs=0.02)
    assert sidecar.mean_layer_sparsity == pytest.approx(target, abs=0.02)
    for measured, wanted in zip(sidecar.layer_sparsity, layer_targets):
        assert measured == pytest.approx(wanted, abs=0.02)
    assert all((t > 0) == (wanted > 0) for t, wanted in zip(sidecar.thresholds, layer_targets))


def test_zero_target_is_dense_and_thresholds_change_the_output(silu_checkpoint, tiny):
    model, calib, heldout = tiny
    fresh, _ = load_model(ModelConfig(path=str(silu_checkpoint), dtype="float32", device="cpu"),
                          silu_checkpoint)
    dense = evaluate(fresh, heldout)
    calibrate(model, calib, 0.0, "uniform")
    assert all(m.act_threshold == 0.0 for m in model.mlps)
    assert evaluate(model, heldout).mean_nll == pytest.approx(dense.mean_nll, rel=1e-6)
    # NOTE: a random tiny model's perplexity is not a quality signal, so only check that
    # thresholds take effect (a random network is not guaranteed to get worse).
    calibrate(model, calib, 0.8, "uniform")
    assert abs(evaluate(model, heldout).mean_nll - dense.mean_nll) > 1e-3


def test_greedy_spends_sparsity_where_it_is_cheap():
    levels = [0.0, 0.1, 0.2, 0.3, 0.4]
    cheap = [0.0, 0.1, 0.2, 0.3, 0.4]
    costly = [0.0, 5.0, 10.0, 15.0, 20.0]
    alloc = greedy_allocation([costly, cheap, costly], levels, 0.2)
    assert alloc[1] == pytest.approx(0.4) and sum(alloc) == pytest.approx(0.6)
    assert alloc[0] + alloc[2] == pytest.approx(0.2)


def test_greedy_table_ranks_layers(tiny):
    model, calib, _ = tiny
    calibrator = Calibrator(model, calib, error_windows=2, step=0.1)
    table = calibrator.error_table()
    assert len(table) == len(model.mlps) and len(table[0]) == len(calibrator.levels)
    for row in table:
        assert row[0] == 0.0 and row[-1] > row[1] > 0.0


def test_measured_scales_move_sparsity_off_the_layer_that_really_hurts():
    levels = [0.0, 0.1, 0.2, 0.3, 0.4]
    row = [0.0, 1.0, 3.0, 6.0, 10.0]   # each step costs more than the last
    # Same estimate everywhere: a tie, so the plain search spreads the sparsity evenly.
    assert greedy_allocation([row, row, row], levels, 0.2) == pytest.approx([0.2, 0.2, 0.2])
    # The measurement says layer 0 costs 10x its estimate, layer 2 half of it.
    scaled = scale_table([row, row, row], [scale_factor(10.0, 1.0), 1.0, scale_factor(1.0, 2.0)])
    assert scaled[0] == pytest.approx([0.0, 10.0, 30.0, 60.0, 100.0])
    assert greedy_allocation(scaled, levels, 0.2) == pytest.approx([0.0, 0.2, 0.4])
    # No information (an estimate or a measurement at zero) leaves the row alone.
    assert scale_factor(0.0, 3.0) == 1.0 and scale_factor(3.0, 0.0) == 1.0
    with pytest.raises(ValueError, match="2 scales for 3 layers"):
        scale_table([row, row, row], [1.0, 1.0])


def test_measured_allocation_hits_target_and_losses_grow_with_sparsity(tiny):
    model, calib, _ = tiny
    before = [m.act_threshold for m in model.mlps]
    calibrator = Calibrator(model, calib, error_windows=2, step=0.1, measure_windows=2)
    assert calibrator.measure_windows == calib[-2:]
    low = calibrator.measured_layer_losses({0: 0.2, 1: 0.2, 2: 0.2})
    high = calibrator.measured_layer_losses({0: 0.8, 2: 0.8})
    assert sorted(high) == [0, 2]
    assert all(low[l] > 0 for l in low) and all(high[l] > low[l] for l in high)
    assert [m.act_threshold for m in model.mlps] == before   # measuring leaves the model as it was
    alloc = calibrator.allocate(0.4, "greedy")
    assert sum(alloc) / len(alloc) == pytest.approx(0.4, abs=1e-9)
    assert len(calibrator.layer_scales) == len(model.mlps) and all(s > 0 for s in calibrator.layer_scales)
    sidecar = calibrate(model, calib, 0.4, "greedy", calibrator=calibrator)
    assert sidecar.calibration["measure_windows"] == 2
    assert sidecar.calibration["layer_targets"] == pytest.approx(alloc)
    assert sidecar.mean_layer_sparsity == pytest.approx(0.4, abs=0.02)
    plain = calibrate(model, calib, 0.4, "greedy", calibrator=calibrator, measure=False)
    assert "measure_windows" not in plain.calibration
    assert plain.calibration["layer_targets"] == greedy_allocation(calibrator.error_table(),
                                                                   calibrator.levels, 0.4)


def _sidecar(num_layers: int = 3, act: str = "silu") -> SparsityFile:
    return SparsityFile(model="tiny", act=act, target_sparsity=0.5, method="greedy",
                        thresholds=[0.01 * (i + 1) for i in range(num_layers)],
                        layer_sparsity=[0.5] * num_layers, num_layers=num_layers,
                        intermediate_size=128, calibration={"num_tokens": 512})


def test_sidecar_round_trip(tmp_path):
    path = tmp_path / "s.json"
    write_sparsity_file(path, _sidecar())
    assert read_sparsity_file(path) == _sidecar()
    assert json.loads(path.read_text())["format"] == "sparse-serve-sparsity/1"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="other/2"), "format"),
    (lambda d: d.update(thresholds=[0.1, -1.0, 0.1]), "layer 1"),
    (lambda d: d.update(thresholds="0.1"), "list"),
    (lambda d: d.pop("thresholds"), "missing"),
    (lambda d: d.update(act="relu"), "activation"),
    (lambda d: d.update(surprise=1), "unknown"),
])
def test_bad_sidecars_are_refused(tmp_path, edit, message):
    raw = json.loads(json.dumps(_sidecar().__dict__))
    edit(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=message):
        read_sparsity_file(path)
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="JSON"):
        read_sparsity_file(path)


def _load(folder, sparsity_file):
    cfg = ModelConfig(path=str(folder), dtype="float32", device="cpu", sparsity_file=str(sparsity_file))
    return load_model(cfg, folder)[0]


def test_loader_applies_sidecar(silu_checkpoint, tmp_path):
    path = tmp_path / "s.json"
    write_sparsity_file(path, _sidecar())
    model = _load(silu_checkpoint, path)
    assert [m.act_threshold for m in model.mlps] == pytest.approx([0.01, 0.02, 0.03])


def test_loader_refuses_mismatched_sidecar(silu_checkpoint, relu_checkpoint, tmp_path):
    path = tmp_path / "s.json"
    write_sparsity_file(path, _sidecar(num_layers=5))
    with pytest.raises(ModelLoadError, match="5 layers.*has 3"):
        _load(silu_checkpoint, path)
    write_sparsity_file(path, _sidecar(num_layers=2))
    with pytest.raises(ModelLoadError, match="relu"):
        _load(relu_checkpoint, path)
    with pytest.raises(ModelLoadError, match="not found"):
        _load(silu_checkpoint, tmp_path / "missing.json")


def test_cli_writes_a_sidecar_the_loader_accepts(silu_checkpoint, tmp_path):
    out = tmp_path / "out" / "sparsity.json"
    rc = main_calibrate(["--model", str(silu_checkpoint), "--target-sparsity", "0.4", "--out", str(out),
                         "--num-windows", "4", "--window", str(WINDOW), "--error-windows", "2",
                         "--device", "cpu", "--log-level", "warning"])
    assert rc == 0
    sidecar = read_sparsity_file(out)
    assert sidecar.method == "greedy" and sidecar.num_layers == 3
    assert sidecar.mean_layer_sparsity == pytest.approx(0.4, abs=0.02)
    model = _load(silu_checkpoint, out)
    assert [m.act_threshold for m in model.mlps] == pytest.approx(sidecar.thresholds)
    assert main_calibrate(["--model", str(silu_checkpoint), "--target-sparsity", "1.5",
                           "--out", str(out), "--log-level", "warning"]) == 2
