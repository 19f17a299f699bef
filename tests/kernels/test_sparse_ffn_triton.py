"""Triton sparse FFN vs the torch reference (interpreter on CPU, compiled on CUDA)."""

import dataclasses
import importlib

import pytest
import torch

pytest.importorskip("triton")

from sparse_serve.kernels import ffn_triton_compact, sparse_ffn_triton
from sparse_serve.kernels import sparse_ffn_ref as sparse_ffn_ref_module
from sparse_serve.kernels.activations import ACTIVATIONS
from sparse_serve.kernels.ffn_triton_compact import CompactConfig
from sparse_serve.kernels.sparse_ffn_ref import group_counts_ref, sparse_ffn_ref
from tests.kernels.kernel_cases import (
    DTYPES,
    SPARSITIES,
    THRESHOLD,
    assert_close,
    assert_mask_equal,
    ffn_weights,
    poison_allocations,
    predicted_mask,
    record_routes,
    triton_device,
)

# (T, H, I): batch 1, 3 (both multiply-reduce in registers) and 5 (tl.dot); H and I off the
# block sizes.
SHAPES = [(1, 96, 80), (3, 70, 90), (5, 150, 70)]
# Small tiles, so that several programs and several steps of each loop run on these shapes.
SMALL_TILES = CompactConfig(gate_block_i=4, gate_block_h=32, down_block_k=4, down_block_h=32,
                            down_split=3, scan_block=16)
# The same, with the partial sums reduced by the down kernel's last program (no reduce launch).
SMALL_TILES_FUSED = dataclasses.replace(SMALL_TILES, down_fused_reduce=True)
# Down tiles that list more slots than these layers have neurons: the down kernel does all its
# work in the step before its loop, and some of its programs find no slot at all.
WIDE_DOWN = dataclasses.replace(SMALL_TILES_FUSED, down_block_k=32, down_split=4)
CONFIGS = [None, SMALL_TILES, SMALL_TILES_FUSED, WIDE_DOWN]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_predicted_mode(monkeypatch, shape, sparsity, dtype):
    T, H, I = shape
    gen = torch.Generator().manual_seed(hash((shape, sparsity)) % 2**31)
    device = triton_device()
    x, wg, wu, wd = ffn_weights(T, H, I, dtype, gen, device)
    pred = predicted_mask(T, I, sparsity, gen).to(device)
    # NOTE: the interpreter is slow, so each case runs one activation, cycling through all four
    # across the sweep (test_exact_mode covers every activation x dtype x shape).
    act = ACTIVATIONS[(SPARSITIES.index(sparsity) + SHAPES.index(shape) + DTYPES.index(dtype)) % 4]
    poison_allocations(monkeypatch, sparse_ffn_triton)
    poison_allocations(monkeypatch, ffn_triton_compact)
    config = CONFIGS[(SPARSITIES.index(sparsity) + SHAPES.index(shape)) % len(CONFIGS)]
    # Half the cases hand over the predictor's per-group counts (no compaction launch): every
    # shape x sparsity runs both ways across the dtypes.
    counts = (group_counts_ref(pred)
              if (SPARSITIES.index(sparsity) + DTYPES.index(dtype)) % 2 else None)
    out, active = sparse_ffn_triton.sparse_ffn_triton(
        x, wg, wu, wd, act, THRESHOLD[act], pred, compact_config=config,
        predicted_group_counts=counts)
    ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, act, THRESHOLD[act], pred)
    assert_close(out, ref, dtype)
    assert_mask_equal(active, ref_active)
    assert not (active & ~pred).any(), "an unpredicted neuron was reported active"
    if sparsity == 1.0:
        assert out.abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_exact_mode(monkeypatch, shape, act, dtype):
    T, H, I = shape
    gen = torch.Generator().manual_seed(7)
    device = triton_device()
    x, wg, wu, wd = ffn_weights(T, H, I, dtype, gen, device)
    poison_allocations(monkeypatch, sparse_ffn_triton)
    poison_allocations(monkeypatch, ffn_triton_compact)
    # The compacted path alternates between the default and the small tiles (several programs
    # and loop steps in the gate pass too).
    config = CONFIGS[(SHAPES.index(shape) + ACTIVATIONS.index(act)) % len(CONFIGS)]
    if config is not None:
        config = dataclasses.replace(config, gate_pass_block_i=4, gate_pass_block_h=32)
    out, active = sparse_ffn_triton.sparse_ffn_triton(x, wg, wu, wd, act, THRESHOLD[act],
                                                      compact_config=config)
    ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, act, THRESHOLD[act])
    assert_close(out, ref, dtype)
    assert_mask_equal(active, ref_active)
    # The data must exercise both branches of the activation, or the test proves little.
    assert 0 < ref_active.sum() < ref_active.numel()


def test_dense_fallback_gives_same_result():
    gen = torch.Generator().manual_seed(3)
    device = triton_device()
    x, wg, wu, wd = ffn_weights(2, 64, 48, torch.float32, gen, device)
    pred = predicted_mask(2, 48, 0.5, gen).to(device)
    sparse = sparse_ffn_triton.sparse_ffn_triton(x, wg, wu, wd, "drelu", 0.0, pred, 1.0)
    dense = sparse_ffn_triton.sparse_ffn_triton(x, wg, wu, wd, "drelu", 0.0, pred, 0.0)
    assert_close(sparse[0], dense[0], torch.float32)
    assert_mask_equal(sparse[1], dense[1])


def test_rejects_bad_layout():
    device = triton_device()
    x = torch.randn(1, 32, device=device)
    w = torch.randn(32, 16, device=device).t()  # [16, 32] but stride(1) != 1
    with pytest.raises(AssertionError):
        sparse_ffn_triton.sparse_ffn_triton(x, w, w, w, "relu")


@pytest.mark.parametrize("scan_block", [0, 16])
def test_compaction_scans_in_several_chunks(monkeypatch, scan_block):
    # A mask wider than one scan chunk (the default chunk is 16384 neurons: shrink it).
    monkeypatch.setattr(ffn_triton_compact, "_COMPACT_MAX_BLOCK", 32)
    gen = torch.Generator().manual_seed(5)
    device = triton_device()
    x, wg, wu, wd = ffn_weights(2, 40, 150, torch.float32, gen, device)
    pred = predicted_mask(2, 150, 0.7, gen).to(device)
    config = CompactConfig(scan_block=scan_block)
    out, active = sparse_ffn_triton.sparse_ffn_triton(x, wg, wu, wd, "relu", 0.0, pred,
                                                      compact_config=config)
    ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, "relu", 0.0, pred)
    assert_close(out, ref, torch.float32)
    assert_mask_equal(active, ref_active)


@pytest.mark.parametrize("T, max_groups, programs_per_sm",
                         [(1, 256, 4), (3, 2, 0), (5, 3, 1), (2, 256, 4)])
def test_group_counts_list_the_neurons_as_the_compaction_does(monkeypatch, T, max_groups,
                                                              programs_per_sm):
    # The gate/up programs that find their own neurons from the group counts must list them in
    # the compaction's order: the same slots, so the same output bit for bit. max_groups 2-3
    # widens the groups (256 or 512 neurons) on this small layer. Under the interpreter a
    # "device" has one SM: 1 or 4 programs take several slot blocks each; 0 launches one
    # program per slot block.
    monkeypatch.setattr(sparse_ffn_ref_module, "MAX_PREDICTION_GROUPS", max_groups)
    gen = torch.Generator().manual_seed(17 + T)
    device = triton_device()
    x, wg, wu, wd = ffn_weights(T, 48, 700, torch.float32, gen, device)
    pred = predicted_mask(T, 700, 0.8, gen).to(device)
    counts = group_counts_ref(pred)
    assert counts.numel() <= max_groups
    poison_allocations(monkeypatch, ffn_triton_compact)
    compacted = sparse_ffn_triton.sparse_ffn_triton(x, wg, wu, wd, "fatrelu", 0.1, pred,
                                                    compact_config=SMALL_TILES_FUSED)
    config = dataclasses.replace(SMALL_TILES_FUSED, gate_programs_per_sm=programs_per_sm)
    counted = sparse_ffn_triton.sparse_ffn_triton(x, wg, wu, wd, "fatrelu", 0.1, pred,
                                                  compact_config=config,
                                                  predicted_group_counts=counts)
    assert torch.equal(counted[0], compacted[0])
    assert_mask_equal(counted[1], compacted[1])
    assert_close(counted[0], sparse_ffn_ref(x, wg, wu, wd, "fatrelu", 0.1, pred)[0], torch.float32)


@pytest.mark.parametrize("T", [1, 3, 5])
def test_the_gate_up_grid_changes_no_bit(monkeypatch, T):
    # The gate/up programs take slot blocks in turn (a few per SM) or one block each (0): the
    # same slots either way, so the same bits, on both paths (mask alone, mask and counts) and
    # in exact mode below DOT_MIN_ROWS rows. One "SM", so that on a GPU too the programs loop.
    monkeypatch.setattr(ffn_triton_compact, "_num_sms", lambda device: 1)
    gen = torch.Generator().manual_seed(23 + T)
    device = triton_device()
    x, wg, wu, wd = ffn_weights(T, 64, 300, torch.float32, gen, device)
    pred = predicted_mask(T, 300, 0.7, gen).to(device)
    poison_allocations(monkeypatch, ffn_triton_compact)
    calls = [dict(act="relu", predicted=pred, counts=None),
             dict(act="relu", predicted=pred, counts=group_counts_ref(pred))]
    if T < 4:   # (exact mode from 4 rows runs the masked kernels)
        calls.append(dict(act="fatrelu", predicted=None, counts=None))
    for call in calls:
        outs = [sparse_ffn_triton.sparse_ffn_triton(
                    x, wg, wu, wd, call["act"], 0.1, call["predicted"],
                    compact_config=dataclasses.replace(SMALL_TILES_FUSED,
                                                       gate_programs_per_sm=programs),
                    predicted_group_counts=call["counts"])
                for programs in (0, 1, 3)]
        for out, active in outs[1:]:
            assert torch.equal(out, outs[0][0])
            assert torch.equal(active, outs[0][1])
        ref = sparse_ffn_ref(x, wg, wu, wd, call["act"], 0.1, call["predicted"])[0]
        assert_close(outs[0][0], ref, torch.float32)


def test_group_counts_need_their_mask():
    device = triton_device()
    x, wg, wu, wd = ffn_weights(1, 32, 300, torch.float32, torch.Generator().manual_seed(0), device)
    pred = predicted_mask(1, 300, 0.5, torch.Generator().manual_seed(1)).to(device)
    counts = group_counts_ref(pred)
    with pytest.raises(ValueError, match="needs the predicted mask"):
        sparse_ffn_triton.sparse_ffn_triton(x, wg, wu, wd, "relu", 0.0, None,
                                            predicted_group_counts=counts)
    for bad in (counts[:2], counts.long(), counts.repeat(2)[::2]):   # shape, dtype, layout
        with pytest.raises(ValueError, match="group counts must be contiguous int32"):
            sparse_ffn_triton.sparse_ffn_triton(x, wg, wu, wd, "relu", 0.0, pred,
                                                predicted_group_counts=bad)


@pytest.mark.parametrize("T", [1, 5])
def test_fused_reduce_is_repeatable_and_resets_its_tickets(monkeypatch, T):
    gen = torch.Generator().manual_seed(11 + T)
    device = triton_device()
    x, wg, wu, wd = ffn_weights(T, 72, 100, torch.float32, gen, device)
    pred = predicted_mask(T, 100, 0.6, gen).to(device)
    poison_allocations(monkeypatch, ffn_triton_compact)
    ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, "drelu", 0.0, pred)
    outs = []
    for _ in range(3):  # a ticket left non-zero would make the next call's reduction skip
        out, active = sparse_ffn_triton.sparse_ffn_triton(x, wg, wu, wd, "drelu", 0.0, pred,
                                                          compact_config=SMALL_TILES_FUSED)
        assert_close(out, ref, torch.float32)
        assert_mask_equal(active, ref_active)
        outs.append(out)
    assert all(torch.equal(o, outs[0]) for o in outs), "the fused reduction is not deterministic"
    assert all(int(t.abs().sum()) == 0 for t in ffn_triton_compact._TICKETS.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("T, counted", [(1, False), (5, False), (1, True), (5, True)])
def test_replays_in_a_cuda_graph(T, counted):
    # Captured in a CUDA graph, as the engine runs decode, and replayed after the input changed:
    # the fused reduction's tickets must come back to zero inside the graph too.
    gen = torch.Generator().manual_seed(13 + T)
    x, wg, wu, wd = ffn_weights(T, 512, 1024, torch.bfloat16, gen, "cuda")
    pred = predicted_mask(T, 1024, 0.9, gen).cuda()
    counts = group_counts_ref(pred) if counted else None
    config = dataclasses.replace(SMALL_TILES_FUSED, gate_block_h=128, down_block_h=64)

    def call():
        return sparse_ffn_triton.sparse_ffn_triton(x, wg, wu, wd, "silu", 0.0, pred,
                                                   compact_config=config,
                                                   predicted_group_counts=counts)
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, active = call()
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=gen).to(x))
        pred.copy_(predicted_mask(T, 1024, 0.9, gen))
        if counted:   # (the predictor's launch writes them in the engine)
            counts.copy_(group_counts_ref(pred))
        graph.replay()
        ref, ref_active = sparse_ffn_ref(x, wg, wu, wd, "silu", 0.0, pred)
        assert_close(out, ref, torch.bfloat16)
        assert_mask_equal(active, ref_active)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA dispatch needs a CUDA device")
@pytest.mark.parametrize("T, exact, route", [
    (1, True, "triton"), (4, True, "triton"), (8, True, "triton"), (9, True, "dense"),
    (8, False, "triton"), (9, False, "dense"),       # cuBLAS from 9 rows (CUDA_SPARSE_MAX_ROWS)
])
def test_cuda_dispatch_rule(monkeypatch, T, exact, route):
    dispatch = importlib.import_module("sparse_serve.kernels.sparse_ffn")
    calls = record_routes(monkeypatch, dense=(dispatch, "dense_ffn"),
                          triton=(sparse_ffn_triton, "sparse_ffn_triton"))
    gen = torch.Generator().manual_seed(T)
    x, wg, wu, wd = ffn_weights(T, 64, 96, torch.float32, gen, "cuda")
    pred = None if exact else predicted_mask(T, 96, 0.5, gen).cuda()
    out, _ = dispatch.sparse_ffn(x, wg, wu, wd, "relu", 0.0, predicted=pred)
    assert calls == [route]
    assert_close(out, sparse_ffn_ref(x, wg, wu, wd, "relu", 0.0, pred)[0], torch.float32)
