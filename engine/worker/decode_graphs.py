"""Decode steps replayed as CUDA graphs: one graph per batch-size bucket, captured at start-up.

A decode-only step of B sequences (one new token each, every one sampled) runs the graph of the
smallest bucket >= B; its inputs are copied into the graph's static buffers first. Everything
from the embedding to the logits is inside the graph: predictor, sparse FFN (group counts
included), paged attention, head. Prefill and mixed steps, shadow-check steps and contexts longer
than `max_capture_len` run eagerly.

Padding rows (bucket - B of them): token 0 at position 0, seq len 1, their KV slot in the scratch
block the runner keeps outside the block manager, and a zero in `real_rows`, which zeroes their
embedding. A zero residual stays exactly zero through every layer (RMSNorm(0) = 0; q = k = v = 0;
attention over the scratch slot, which only padding rows write, returns 0; the FFN of a zero input
is 0), so no neuron fires for them, a bias-free predictor predicts none of them at a threshold >= 0,
they add no weight row to what the batch reads, and their rows are cut from every per-token count before
the runner reads it. The runner refuses graphs for predictor thresholds below 0.

On a CPU (tests) the same code runs with capture replaced by direct calls (`capture=False`), so
the bucket and padding logic is checked without a GPU.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch

from sparse_serve.engine.models.attention import AttentionMetadata
from sparse_serve.engine.models.ffn import FFNActivity
from sparse_serve.engine.models.llama import CausalLM

logger = logging.getLogger(__name__)

# NOTE: as in vLLM, longer contexts decode eagerly: the graph's block table has a fixed width, and
# the paged-attention kernel launches one program per 128 positions of that width.
DEFAULT_MAX_CAPTURE_LEN = 8192


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8, up to (and including) max_num_seqs."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 8))
    sizes.add(max_num_seqs)
    return sorted(sizes)


@dataclasses.dataclass
class HostBatch:
    """One step's inputs on the host: token_ids, positions and slots per new token; the rest
    per sequence. In a decode-only step the two coincide."""
    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]


def trim_rows(activity: FFNActivity, num_rows: int, bucket: int) -> FFNActivity:
    """A copy of an FFN activity record whose per-token tensors keep their first num_rows rows;
    the per-batch values (rows read, shadow ratios) are already padding-free."""
    if num_rows == bucket:
        return activity
    return dataclasses.replace(activity, **{name: getattr(activity, name)[:num_rows]
                                            for name in FFNActivity.PER_TOKEN})


class DecodeGraphs:
    def __init__(self, model: CausalLM, max_num_seqs: int, max_capture_len: int, block_size: int,
                 scratch_block: int, capture: bool):
        param = model.model.embed_tokens.weight
        self.model, self.device, self.dtype = model, param.device, param.dtype
        self.sizes = capture_sizes(max_num_seqs)
        self.block_size = block_size
        self.max_capture_len = max_capture_len
        self.width = -(-max_capture_len // block_size)       # block-table columns
        self.scratch_block = scratch_block
        self.capture = capture
        n, on = self.sizes[-1], dict(device=self.device)
        # Static inputs, sliced per bucket; every row starts as a padding row.
        self.input_ids = torch.zeros(n, dtype=torch.long, **on)
        self.positions = torch.zeros(n, dtype=torch.long, **on)
        self.slots = torch.full((n,), scratch_block * block_size, dtype=torch.long, **on)
        self.block_tables = torch.full((n, self.width), scratch_block, dtype=torch.int32, **on)
        self.seq_lens = torch.ones(n, dtype=torch.int32, **on)
        self.real_rows = torch.zeros(n, 1, dtype=self.dtype, **on)
        # Host staging: pinned on CUDA, so the copies into the static buffers are asynchronous.
        # NOTE: reused every step; safe because each step ends with the sampler's read-back,
        # after which this step's copies have completed.
        pin = self.device.type == "cuda"
        self._host = {name: torch.zeros(t.shape, dtype=t.dtype, pin_memory=pin)
                      for name, t in (("input_ids", self.input_ids), ("positions", self.positions),
                                      ("slots", self.slots), ("block_tables", self.block_tables),
                                      ("seq_lens", self.seq_lens), ("real_rows", self.real_rows))}
        self._graphs: dict[int, Callable[[list[int]], tuple]] = {}
        self._pool = None
        self.capture_seconds = 0.0
        self.graph_bytes = 0

    # ---- start-up -------------------------------------------------------------------------
    def capture_all(self) -> None:
        started = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0] if self.capture else 0
        # NOTE: largest first, so the smaller graphs fit in the memory pool the largest made.
        for size in reversed(self.sizes):
            self._graphs[size] = self._capture(size) if self.capture else self._direct(size)
        if self.capture:
            torch.cuda.synchronize(self.device)
            self.graph_bytes = max(free_before - torch.cuda.mem_get_info(self.device)[0], 0)
        self.capture_seconds = time.perf_counter() - started
        logger.info("decode %s for batch sizes %s: %.1f s, %.1f MiB", "CUDA graphs" if self.capture
                    else "buckets (direct calls, no capture)", self.sizes, self.capture_seconds,
                    self.graph_bytes / 2**20)

    def _forward(self, size: int, seq_lens: list[int]):
        meta = AttentionMetadata(
            query_lens=[1] * size, seq_lens=seq_lens, slot_mapping=self.slots[:size],
            block_tables=self.block_tables[:size], seq_lens_tensor=self.seq_lens[:size],
            block_size=self.block_size, real_rows=self.real_rows[:size])
        hidden, activities = self.model(self.input_ids[:size], self.positions[:size], meta)
        return self.model.compute_logits(hidden), activities

    def _direct(self, size: int):
        return lambda seq_lens: self._forward(size, seq_lens)

    def _capture(self, size: int):
        pad_lens = [1] * size        # host lengths are read by the CPU attention path only
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):   # warm-up: Triton compiles, lazy buffers get allocated
            for _ in range(2):
                self._forward(size, pad_lens)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self._forward(size, pad_lens)
        self._pool = graph.pool()

        def replay(_seq_lens: list[int]):
            graph.replay()
            return outputs
        return replay

    # ---- per step -------------------------------------------------------------------------
    def fits(self, batch_size: int, max_seq_len: int) -> bool:
        return bool(self._graphs) and batch_size <= self.sizes[-1] and max_seq_len <= self.max_capture_len

    def bucket(self, batch_size: int) -> int:
        return next(size for size in self.sizes if size >= batch_size)

    def run(self, batch: HostBatch) -> tuple[torch.Tensor, list]:
        """-> (logits [B, V] float32, a view of the graph's output valid until the next run;
        one FFN activity record per layer, padding rows cut)."""
        rows = len(batch.token_ids)
        size = self.bucket(rows)
        self._stage(batch, size)
        logits, activities = self._graphs[size](batch.seq_lens + [1] * (size - rows))
        return logits[:rows], [trim_rows(a, rows, size) for a in activities]

    def _stage(self, batch: HostBatch, size: int) -> None:
        """Writes rows [0, size) of the static inputs: the batch, then padding."""
        rows = len(batch.token_ids)
        host = {name: t.numpy() for name, t in self._host.items() if name != "real_rows"}  # int views
        host["input_ids"][:rows] = batch.token_ids
        host["positions"][:rows] = batch.positions
        host["slots"][:rows] = batch.slots
        host["seq_lens"][:rows] = batch.seq_lens
        host["input_ids"][rows:size] = 0
        host["positions"][rows:size] = 0
        host["slots"][rows:size] = self.scratch_block * self.block_size
        host["seq_lens"][rows:size] = 1
        width = max(len(t) for t in batch.block_tables)
        tables = host["block_tables"]
        tables[:size, :width] = self.scratch_block
        for row, table in enumerate(batch.block_tables):
            tables[row, :len(table)] = table
        mask = self._host["real_rows"]
        mask[:rows] = 1
        mask[rows:size] = 0
        for name in ("input_ids", "positions", "slots", "seq_lens", "real_rows"):
            getattr(self, name)[:size].copy_(self._host[name][:size], non_blocking=True)
        self.block_tables[:size, :width].copy_(self._host["block_tables"][:size, :width], non_blocking=True)


def padding_is_silent(model: CausalLM) -> bool:
    """Padding rows fire no predictor neuron only at thresholds >= 0 (see the module docstring)."""
    return all(not (mlp.predictor is not None and mlp.use_predictor and mlp.predictor_threshold < 0)
               for mlp in model.mlps)

