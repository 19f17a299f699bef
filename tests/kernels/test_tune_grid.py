"""The tile sweep's grid (bench/tune_triton_ffn.py): what it keeps and drops, on the CPU."""

import dataclasses

from bench.tune_triton_ffn import (
    COMPACTION_STAGE,
    COUNTED_GRID_STAGE,
    EXACT_STAGES,
    FFN_STAGES,
    PER_THREAD,
    _grid,
    _per_thread,
)
from kernels.ffn_triton_compact import default_config
from kernels.triton_utils import DOT_MIN_ROWS


def test_multiply_reduce_tiles_stay_within_the_per_thread_range():
    base = default_config(1)
    joint = FFN_STAGES[0]                    # gate tile and warps together
    kept = _grid(joint, 1, base)
    lo, hi = PER_THREAD
    assert 0 < len(kept) < len(_grid(joint, 1))            # some dropped, some left
    for combo in kept:
        (n,) = _per_thread(dataclasses.replace(base, **combo), set(combo))
        assert lo <= n <= hi
    # the widest tile is tried with the most warps, never with the fewest
    assert dict(gate_block_i=4, gate_block_h=4096, gate_warps=8) in kept
    assert dict(gate_block_i=4, gate_block_h=4096, gate_warps=2) not in kept


def test_stages_that_change_no_tile_are_not_filtered():
    base = dataclasses.replace(default_config(1), down_block_k=32, down_block_h=1024,
                               down_warps=2)   # a down tile outside the range
    for stage in (COMPACTION_STAGE, FFN_STAGES[0], COUNTED_GRID_STAGE, *EXACT_STAGES):
        assert _grid(stage, 1, base) == _grid(stage, 1, default_config(1))


def test_dot_batches_drop_tiles_below_the_padding():
    for combo in _grid(FFN_STAGES[0], DOT_MIN_ROWS, default_config(DOT_MIN_ROWS)):
        assert combo["gate_block_i"] >= 16


def test_down_tiles_are_swept_with_the_split():
    # the down stage pairs tiles with splits, so a tile that lists every slot of a batch-1, 90%
    # layer (~1430) in one step of each program is among those tried
    down = next(stage for stage in FFN_STAGES if "down_block_k" in stage)
    kept = _grid(down, 1, default_config(1))
    assert "down_split" in down
    assert any(c["down_block_k"] * c["down_split"] >= 1434 for c in kept)
    assert any(c["down_block_k"] * c["down_split"] < 1434 for c in kept)
