"""The tile sweep's grid (bench/tune_triton_ffn.py): what it keeps and drops, on the CPU."""

import dataclasses

from sparse_serve.bench.tune_triton_ffn import (
    COMPACTION_STAGE,
    EXACT_STAGES,
    FFN_STAGES,
    PER_THREAD,
    _grid,
    _per_thread,
)
from sparse_serve.kernels.ffn_triton_compact import default_config
from sparse_serve.kernels.triton_utils import DOT_MIN_ROWS

# the stage that sweeps the gate/up tile's rows with its warps (and the grid)
GATE_TILE_STAGE = next(stage for stage in FFN_STAGES if "gate_block_i" in stage)
DOWN_TILE_STAGE = next(stage for stage in FFN_STAGES if "down_block_k" in stage)


def test_multiply_reduce_tiles_stay_within_the_per_thread_range():
    base = dataclasses.replace(default_config(1), gate_block_h=2048)
    kept = _grid(GATE_TILE_STAGE, 1, base)
    lo, hi = PER_THREAD
    assert 0 < len(kept) < len(_grid(GATE_TILE_STAGE, 1))   # some dropped, some left
    for combo in kept:
        (n,) = _per_thread(dataclasses.replace(base, **combo), set(combo))
        assert lo <= n <= hi
    # a tile of 16 rows is tried with the most warps, never with the fewest
    assert any(c["gate_block_i"] == 16 and c["gate_warps"] == 8 for c in kept)
    assert not any(c["gate_block_i"] == 16 and c["gate_warps"] == 1 for c in kept)


def test_stages_that_change_no_tile_are_not_filtered():
    base = dataclasses.replace(default_config(1), down_block_k=32, down_block_h=1024,
                               down_warps=2)   # a down tile outside the range
    for stage in (COMPACTION_STAGE, *FFN_STAGES[:2], *EXACT_STAGES):
        assert _grid(stage, 1, base) == _grid(stage, 1, default_config(1))


def test_dot_batches_drop_tiles_below_the_padding():
    kept = _grid(GATE_TILE_STAGE, DOT_MIN_ROWS, default_config(DOT_MIN_ROWS))
    assert kept
    for combo in kept:
        assert combo["gate_block_i"] >= 16


def test_down_tiles_are_swept_with_the_split():
    # the down stage pairs tiles with splits, so a tile that lists every slot of a batch-1, 90%
    # layer (~1430) in one step of each program is among those tried
    kept = _grid(DOWN_TILE_STAGE, 1, default_config(1))
    assert "down_split" in DOWN_TILE_STAGE
    assert any(c["down_block_k"] * c["down_split"] >= 1434 for c in kept)
    assert any(c["down_block_k"] * c["down_split"] < 1434 for c in kept)
