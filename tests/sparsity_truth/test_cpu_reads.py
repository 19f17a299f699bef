"""The CPU FFN paths report exactly the weight rows they read (issue 23's proof).

For each path and mode, on batches whose rows predict and fire different neurons:
  - the reported (gate, up, down) rows equal the independent count of tests/sparsity_truth/
    read_model.py, made from the inputs alone;
  - poisoning every row outside the rows whose values the count says enter the result (NaN)
    leaves the output finite and bit-for-bit the same: the path used no other row;
  - where a path must read a silent neuron's row (dense, gathered), poisoning that row alone
    turns the output NaN: the count does not claim rows the path skips.
"""
from __future__ import annotations

import pytest
import torch

from sparse_serve.kernels import cpu_native, sparse_ffn_cpu
from sparse_serve.kernels import sparse_ffn as dispatch
from sparse_serve.kernels.activations import ACTIVATIONS
from tests.kernels.kernel_cases import record_routes
from tests.sparsity_truth.cases import THRESHOLD, check_mixed, mixed_batch
from tests.sparsity_truth.read_model import dense_rows, gathered_rows, masks_of, native_rows, poison_outside

needs_native = pytest.mark.skipif(not cpu_native.available(), reason="no C++ compiler for the native kernel")


def reported(fn, x, weights, *args) -> tuple[torch.Tensor, list[int]]:
    rows = torch.full((3,), -1, dtype=torch.int64)
    out, _ = fn(x, *weights, *args, rows_read=rows)
    return out, rows.tolist()


def assert_unused_rows_untouched(fn, x, weights, args, used_masks, out, counts) -> None:
    poisoned = poison_outside(weights, used_masks)
    assert any(torch.isnan(w).any() for w in poisoned), "nothing was poisoned: the test could not tell"
    out_p, counts_p = reported(fn, x, poisoned, *args)
    assert torch.isfinite(out_p).all(), "the path used a row outside the ones counted"
    assert torch.equal(out_p, out) and counts_p == counts


def assert_row_is_read(fn, x, weights, args, which: int, rows: torch.Tensor) -> None:
    """Poisoning `rows` of weight `which` (0 gate, 1 up, 2 down) alone makes the output NaN."""
    assert rows.any(), "no such row in this batch: the test could not tell"
    poisoned = [w.clone() for w in weights]
    poisoned[which][rows] = float("nan")
    out_p, _ = reported(fn, x, poisoned, *args)
    assert torch.isnan(out_p).any()


# (T, H, I): batch 1 (one pass per neuron, in chunks of 256: I spans two) and a mixed batch
# (two phases); H 64 lets every prefetch hint fire, H 12 only axpy's (dot_rows needs 16).
NATIVE_SHAPES = [(1, 64, 300), (1, 12, 300), (5, 64, 300), (3, 12, 90)]


@needs_native
@pytest.mark.parametrize("mode", ["exact", "predicted"])
@pytest.mark.parametrize("shape", NATIVE_SHAPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_native_kernel_reports_its_reads(act, shape, mode):
    T, H, I = shape
    x, weights, predicted, n = mixed_batch(T, H, I, act, 0.4 if mode == "predicted" else None,
                                           seed=ACTIVATIONS.index(act) * 1000)
    check_mixed(n)
    args = (act, THRESHOLD[act], predicted)
    out, counts = reported(sparse_ffn_cpu.sparse_ffn_native, x, weights, *args)
    lib = cpu_native.load()
    expected = native_rows(n, act, predicted is not None, H, bool(lib.sparse_ffn_cpu_prefetches()),
                           lib.sparse_ffn_cpu_row_chunk())
    assert counts == [int(m.sum()) for m in expected]
    # The values of gate rows P, up rows S and down rows A enter the result, no others (the
    # rest of the count is rows prefetched ahead of a use that did not come).
    assert_unused_rows_untouched(sparse_ffn_cpu.sparse_ffn_native, x, weights, args, [n.P, n.S, n.A], out, counts)


@needs_native
def test_native_kernel_16_bit_weights():
    x, weights, predicted, n = mixed_batch(4, 64, 200, "drelu", 0.5, dtype=torch.bfloat16, seed=7)
    args = ("drelu", 0.0, predicted)
    out, counts = reported(sparse_ffn_cpu.sparse_ffn_native, x, weights, *args)
    lib = cpu_native.load()
    expected = native_rows(n, "drelu", True, 64, bool(lib.sparse_ffn_cpu_prefetches()), lib.sparse_ffn_cpu_row_chunk())
    assert counts == [int(m.sum()) for m in expected]
    assert_unused_rows_untouched(sparse_ffn_cpu.sparse_ffn_native, x, weights, args, [n.P, n.S, n.A], out, counts)


@pytest.mark.parametrize("mode", ["exact", "predicted"])
@pytest.mark.parametrize("act", ["relu", "drelu", "silu"])
def test_torch_gather_path_reports_its_reads(act, mode):
    x, weights, predicted, n = mixed_batch(3, 40, 120, act, 0.15 if mode == "predicted" else None, seed=11)
    check_mixed(n)
    args = (act, THRESHOLD[act], predicted)
    out, counts = reported(sparse_ffn_cpu.sparse_ffn_torch, x, weights, *args)
    exact = predicted is None
    assert counts == gathered_rows(n, exact)
    used = masks_of("gathered_exact" if exact else "gathered_predicted", n)
    assert_unused_rows_untouched(sparse_ffn_cpu.sparse_ffn_torch, x, weights, args, used, out, counts)
    # The gathered down rows of silent neurons are really read (weighted by a zero). Exact mode
    # gathers alive neurons, silent only under drelu (u < 0); relu and silu have none to poison.
    if not exact or act == "drelu":
        assert_row_is_read(sparse_ffn_cpu.sparse_ffn_torch, x, weights, args, 2, used[2] & ~n.A)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_dense_fallback_reports_every_row(monkeypatch, act):
    """sparse_ffn's dense fallback (here forced by a fallback fraction of 0): all rows, and the
    rows of silent neurons really are read."""
    x, weights, predicted, n = mixed_batch(4, 40, 100, act, 0.3, seed=21)
    routes = record_routes(monkeypatch, dense=(dispatch, "dense_ffn"))
    args = (act, THRESHOLD[act], predicted, 0.0)
    out, counts = reported(dispatch.sparse_ffn, x, weights, *args)
    assert routes == ["dense"]
    assert counts == dense_rows(n)
    assert_row_is_read(dispatch.sparse_ffn, x, weights, args, 2, ~n.A)     # down rows of silent neurons
    assert_row_is_read(dispatch.sparse_ffn, x, weights, args, 1, ~n.S)     # up rows of dead gates


@needs_native
def test_cpu_dispatch_reports_the_path_it_took(monkeypatch):
    """The dispatcher passes the count of whichever path it took: native by default, the torch
    path or dense without the native kernel, dense above the fallback fraction."""
    x, weights, predicted, n = mixed_batch(3, 64, 160, "relu", 0.05, seed=31)
    lib = cpu_native.load()
    native = [int(m.sum()) for m in native_rows(n, "relu", True, 64, bool(lib.sparse_ffn_cpu_prefetches()),
                                                lib.sparse_ffn_cpu_row_chunk())]
    routes = record_routes(monkeypatch, native=(sparse_ffn_cpu, "sparse_ffn_native"),
                           torch=(sparse_ffn_cpu, "sparse_ffn_torch"), dense=(dispatch, "dense_ffn"))
    _, counts = reported(dispatch.sparse_ffn, x, weights, "relu", 0.0, predicted, 1.0)
    assert routes[-1] == "native" and counts == native
    monkeypatch.setattr(sparse_ffn_cpu, "native_supported", lambda *a: False)
    _, counts = reported(dispatch.sparse_ffn, x, weights, "relu", 0.0, predicted, 1.0)
    assert routes[-1] == "torch" and counts == gathered_rows(n, exact=False)
    _, counts = reported(dispatch.sparse_ffn, x, weights, "relu", 0.0, None, 1.0)
    assert routes[-1] == "dense" and counts == dense_rows(n)
