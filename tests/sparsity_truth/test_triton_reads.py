"""The Triton FFN paths report exactly the weight rows they read (issue 23's proof), run through
Triton's interpreter on small shapes (compiled on CUDA on a GPU host).

Same three checks as test_cpu_reads.py: the reported (gate, up, down) rows equal the count made
from the inputs alone (read_model.py); NaN in every other row leaves the output finite and the
same; NaN in a counted row of a silent neuron alone turns it NaN (the kernel did load it).
Paths: the compacted kernels in predicted mode (the mask's compaction launch, and the
predictor's group counts), exact mode below DOT_MIN_ROWS (dense gate pass, then compacted),
the masked kernels in exact mode from DOT_MIN_ROWS rows, and both dense fallbacks.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from sparse_serve.kernels import dispatch, sparse_ffn_triton  # noqa: E402
from sparse_serve.kernels import sparse_ffn as dispatcher  # noqa: E402
from sparse_serve.kernels.ffn_triton_compact import CompactConfig  # noqa: E402
from sparse_serve.kernels.sparse_ffn_ref import group_counts_ref  # noqa: E402
from sparse_serve.kernels.triton_utils import DOT_MIN_ROWS  # noqa: E402
from tests.kernels.kernel_cases import record_routes, triton_device  # noqa: E402
from tests.sparsity_truth.cases import THRESHOLD, check_mixed, mixed_batch  # noqa: E402
from tests.sparsity_truth.read_model import dense_rows, gathered_rows, masked_rows, masks_of  # noqa: E402

# Small tiles: several programs and loop steps on these shapes.
TILES = CompactConfig(gate_block_i=4, gate_block_h=32, down_block_k=4, down_block_h=32, down_split=3,
                      scan_block=16)
FUSED = dataclasses.replace(TILES, down_fused_reduce=True)
H, I = 48, 56


def on_device(x, weights, predicted):
    device = triton_device()
    return (x.to(device), [w.to(device) for w in weights],
            None if predicted is None else predicted.to(device))


def run_triton(x, weights, act, predicted, config, counts=None, fallback=1.0):
    rows = torch.full((3,), -1, dtype=torch.int64, device=x.device)
    out, _ = sparse_ffn_triton.sparse_ffn_triton(x, *weights, act, THRESHOLD[act], predicted, fallback,
                                                 compact_config=config, predicted_group_counts=counts,
                                                 rows_read=rows)
    return out, rows.tolist()


def poisoned(weights, masks):
    out = []
    for w, mask in zip(weights, masks):
        w = w.clone()
        w[~mask.to(w.device)] = float("nan")
        out.append(w)
    return out


def check_reads(x, weights, act, predicted, config, used, expected, silent_read, counts=None):
    """The count, then NaN outside `used` (same output), then NaN in the down rows
    `silent_read` (counted, of silent neurons) alone (NaN output)."""
    out, got = run_triton(x, weights, act, predicted, config, counts)
    assert got == expected
    out_p, got_p = run_triton(x, poisoned(weights, used), act, predicted, config, counts)
    assert torch.isfinite(out_p).all(), "the kernel used a row outside the ones counted"
    assert torch.equal(out_p, out) and got_p == got
    assert silent_read.any(), "no silent neuron's row is counted: the test could not tell"
    every = torch.ones_like(silent_read)
    out_n, _ = run_triton(x, poisoned(weights, [every, every, ~silent_read]), act, predicted, config, counts)
    assert torch.isnan(out_n).any(), "a counted down row was not read"


@pytest.mark.parametrize("T, act, config, with_counts", [
    (1, "drelu", TILES, False),
    (1, "silu", FUSED, True),
    (3, "relu", TILES, True),
    (DOT_MIN_ROWS + 1, "fatrelu", FUSED, False),
    (DOT_MIN_ROWS + 1, "drelu", TILES, True),
])
def test_compacted_predicted_mode(T, act, config, with_counts):
    x, weights, predicted, n = mixed_batch(T, H, I, act, 0.3, seed=100 + T)
    check_mixed(n)
    x, weights, predicted = on_device(x, weights, predicted)
    counts = group_counts_ref(predicted) if with_counts else None
    check_reads(x, weights, act, predicted, config, masks_of("gathered_predicted", n),
                gathered_rows(n, exact=False), n.P & ~n.A, counts)


@pytest.mark.parametrize("T, act", [(1, "drelu"), (DOT_MIN_ROWS - 1, "drelu")])
def test_compacted_exact_mode(T, act):
    """Below DOT_MIN_ROWS: every gate row (dense pass), then the alive neurons' up and down rows
    (under drelu some alive neurons stay silent: u < 0)."""
    x, weights, _, n = mixed_batch(T, H, I, act, None, seed=200 + T)
    check_mixed(n)
    x, weights, _ = on_device(x, weights, None)
    check_reads(x, weights, act, None, TILES, masks_of("gathered_exact", n), gathered_rows(n, exact=True),
                n.S & ~n.A)


@pytest.mark.parametrize("act", ["relu", "drelu"])
def test_masked_exact_mode(act):
    """From DOT_MIN_ROWS rows: every gate row, up rows where a gate survived, down rows of the
    neurons active in some row (so no silent neuron's down row is counted: poison the up rows
    of dead gates instead, which the count skips)."""
    T = DOT_MIN_ROWS + 1
    x, weights, _, n = mixed_batch(T, H, I, act, None, seed=300)
    check_mixed(n)
    x, weights, _ = on_device(x, weights, None)
    out, got = run_triton(x, weights, act, None, None)
    assert got == masked_rows(n)
    out_p, got_p = run_triton(x, poisoned(weights, masks_of("masked", n)), act, None, None)
    assert torch.isfinite(out_p).all() and torch.equal(out_p, out) and got_p == got
    if act == "drelu":   # alive but silent (u < 0): the up row is counted, and really read
        silent_alive = n.S & ~n.A
        assert silent_alive.any()
        # NOTE: not NaN, which relu(u) (tl.maximum) drops: up rows that make u positive in a
        # row where the gate survived, so the neuron fires if (and only if) the kernel loads them.
        flipped = [w.clone() for w in weights]
        for i in silent_alive.nonzero().flatten().tolist():
            t = int(n.alive[:, i].nonzero()[0])
            flipped[1][i] = x[t].sign() * 10.0
        out_n, _ = run_triton(x, flipped, act, None, None)
        assert not torch.allclose(out_n, out)


def test_dense_fallbacks_report_every_row(monkeypatch):
    """The launcher's own fallback (a fraction below the mask's density) and the dispatcher's
    (more than CUDA_SPARSE_MAX_ROWS rows go to cuBLAS) read, and report, every row."""
    x, weights, predicted, n = mixed_batch(3, H, I, "relu", 0.3, seed=400)
    x, weights, predicted = on_device(x, weights, predicted)
    _, got = run_triton(x, weights, "relu", predicted, TILES, fallback=0.0)
    assert got == dense_rows(n)

    T = dispatcher.CUDA_SPARSE_MAX_ROWS + 1
    x, weights, predicted, n = mixed_batch(T, H, I, "drelu", 0.3, seed=401)
    x, weights, predicted = on_device(x, weights, predicted)
    monkeypatch.setattr(dispatch, "runs_triton", lambda t: True)      # the engine's CUDA path
    routes = record_routes(monkeypatch, dense=(dispatcher, "dense_ffn"))
    rows = torch.full((3,), -1, dtype=torch.int64, device=x.device)
    dispatcher.sparse_ffn(x, *weights, "drelu", 0.0, predicted, rows_read=rows)
    assert routes == ["dense"] and rows.tolist() == dense_rows(n)
