"""The only place where scheduled sequences become tensors.

`execute(SchedulerOutput)` builds token ids, positions, slot mapping and block tables (through
pinned, non-blocking copies), runs the model (decode steps as CUDA graphs where captured),
samples one token for each sequence that caught up with its tokens, and reads the sampled ids,
logprobs and every layer's FFN counts back in one transfer per step.
"""
from __future__ import annotations

import logging
import random

import torch

from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.engine.core.scheduler import SchedulerOutput
from sparse_serve.engine.models.arch_config import ModelArchConfig
from sparse_serve.engine.models.attention import AttentionMetadata
from sparse_serve.engine.models.llama import CausalLM
from sparse_serve.engine.structured.bitmask import apply_grammar_bitmasks
from sparse_serve.engine.worker.activity import RunnerOutput, apply_activity, register_activity
from sparse_serve.engine.worker.decode_graphs import DEFAULT_MAX_CAPTURE_LEN, DecodeGraphs, HostBatch, padding_is_silent
from sparse_serve.engine.worker.host_staging import HostStaging
from sparse_serve.engine.worker.huge_pages import huge_page_bytes, pack_on_huge_pages
from sparse_serve.engine.worker.readback import StepReadback
from sparse_serve.engine.worker.sampler import Sampler, make_generator
from sparse_serve.engine.worker.sampling_tensors import SamplingTensors
from sparse_serve.engine.worker.token_counts import TokenCounts

logger = logging.getLogger(__name__)


def kv_bytes_per_block(arch: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * elem


class ModelRunner:
    def __init__(self, model: CausalLM, config: EngineConfig):
        self.model = model
        self.arch = model.config
        self.config = config
        param = model.model.embed_tokens.weight
        self.device, self.dtype = param.device, param.dtype
        self.block_size = config.cache.block_size
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator | None] = {}
        self.shadow_rate = config.server.predictor_shadow_rate
        self._shadow_rng = random.Random(config.model.seed)
        self.num_blocks = 0
        self.staging = HostStaging(self.device)
        self.decode_graphs: DecodeGraphs | None = None   # set by init_decode_graphs()
        self.token_counts = TokenCounts(model.config.vocab_size, self.device)
        self._sampling_key: tuple[int, ...] | None = None
        self._sampling: SamplingTensors | None = None
        # NOTE: fused q/k/v projections (views, no extra memory): one GEMM per layer per step.
        for layer in model.model.layers:
            layer.self_attn.fuse_qkv()
        if self.device.type == "cpu":
            packed = pack_on_huge_pages(model)
            logger.info("weights packed into a huge-page arena: %.1f MiB", packed / 2**20)
        self.eos_token_ids: set[int] = set()   # set by the engine once EOS ids are known
        self.num_text_tokens: int | None = None   # the tokenizer's size, set by the engine

    # ---- KV cache -------------------------------------------------------------------------
    def profile_num_blocks(self) -> int:
        """Blocks that fit the budget: bytes on CPU, a fraction of free memory on GPU."""
        if self.config.cache.num_blocks:
            return self.config.cache.num_blocks
        per_block = kv_bytes_per_block(self.arch, self.block_size, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.cache.gpu_memory_utilization)
        else:
            budget = self.config.cache.kv_cache_bytes
        return max(budget // per_block, 1)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """num_blocks for the block manager, plus one scratch block (id num_blocks) that only
        CUDA-graph padding rows write."""
        self.scratch_block = num_blocks
        num_blocks += 1
        shape = (num_blocks, self.block_size, self.arch.num_kv_heads, self.arch.head_dim)
        layers = self.model.model.layers
        if self.device.type == "cpu":
            # One zeroed huge-page arena for every layer's K and V (decode gathers from it).
            per_layer = kv_bytes_per_block(self.arch, self.block_size, self.dtype) * num_blocks // len(layers)
            arena = huge_page_bytes(per_layer * len(layers)).zero_().view(self.dtype)
            caches = arena.view(len(layers), 2, *shape)                           # [L, 2, NB, BS, Hkv, D]
            for layer, cache in zip(layers, caches):
                layer.self_attn.kv_cache = (cache[0], cache[1])
        else:
            for layer in layers:
                layer.self_attn.kv_cache = (torch.zeros(shape, dtype=self.dtype, device=self.device),
                                            torch.zeros(shape, dtype=self.dtype, device=self.device))
        self.num_blocks = num_blocks - 1

    def init_decode_graphs(self, max_model_len: int, capture: bool | None = None) -> None:
        """Decode buckets after the KV cache exists: CUDA graphs on a GPU unless
        model.enforce_eager; `capture=False` runs the same buckets with direct calls (tests)."""
        if capture is None:
            if self.config.model.enforce_eager or self.device.type != "cuda":
                # NOTE: on a CPU, padding a batch to a bucket would only add work.
                logger.info("decode runs eagerly (%s)", "enforce_eager" if self.config.model.enforce_eager
                            else "no CUDA device")
                return
            capture = True
        if not padding_is_silent(self.model):
            logger.warning("decode runs eagerly: a predictor threshold below 0 would predict neurons "
                           "for CUDA-graph padding rows")
            return
        graphs = DecodeGraphs(self.model, self.config.scheduler.max_num_seqs,
                              min(max_model_len, DEFAULT_MAX_CAPTURE_LEN), self.block_size,
                              self.scratch_block, capture)
        graphs.capture_all()
        self.decode_graphs = graphs

    # ---- per-sequence state ---------------------------------------------------------------
    def release(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)
        self.token_counts.release(seq_id)

    def _generator(self, seq) -> torch.Generator | None:
        if seq.seq_id not in self.generators:
            seed = seq.params.seed
            # NOTE: sibling choices (n > 1) must differ, so each gets seed + index.
            self.generators[seq.seq_id] = make_generator(None if seed is None else seed + seq.index, self.device)
        return self.generators[seq.seq_id]

    # ---- one step -------------------------------------------------------------------------
    def _host_batch(self, out: SchedulerOutput) -> HostBatch:
        batch = HostBatch([], [], [], [], [], [])
        bs = self.block_size
        for item in out.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            table = seq.block_table
            batch.token_ids.extend(seq.token_ids[start:end])
            batch.positions.extend(range(start, end))
            batch.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            batch.query_lens.append(item.num_new_tokens)
            batch.seq_lens.append(end)
            batch.block_tables.append(table)
        return batch

    def _device_inputs(self, batch: HostBatch):
        width = max(len(t) for t in batch.block_tables)
        flat_tables = [b for t in batch.block_tables for b in t + [0] * (width - len(t))]
        put = self.staging.to_device
        meta = AttentionMetadata(
            query_lens=batch.query_lens, seq_lens=batch.seq_lens,
            slot_mapping=put("slots", batch.slots, torch.long),
            block_tables=put("block_tables", flat_tables, torch.int32).view(len(batch.block_tables), width),
            seq_lens_tensor=put("seq_lens", batch.seq_lens, torch.int32),
            block_size=self.block_size)
        return put("input_ids", batch.token_ids, torch.long), put("positions", batch.positions, torch.long), meta

    @staticmethod
    def _sample_rows(out: SchedulerOutput) -> tuple[list, list[int]]:
        """The rows whose next token we sample: the last new token of each caught-up sequence."""
        sample_items, rows, row = [], [], -1
        for item in out.scheduled:
            row += item.num_new_tokens
            if item.samples:
                sample_items.append(item)
                rows.append(row)
        return sample_items, rows

    def _use_graphs(self, batch: HostBatch, rows: list[int], shadow: bool) -> bool:
        """Graphs run decode-only steps that sample every row (shadow steps run eagerly)."""
        return (self.decode_graphs is not None and not shadow and len(rows) == len(batch.token_ids)
                and all(q == 1 for q in batch.query_lens)
                and self.decode_graphs.fits(len(rows), max(batch.seq_lens)))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        batch = self._host_batch(out)
        shadow = self.shadow_rate > 0 and self._shadow_rng.random() < self.shadow_rate
        for mlp in self.model.mlps:
            mlp.shadow_check = shadow
        sample_items, rows = self._sample_rows(out)
        if self._use_graphs(batch, rows, shadow):
            logits, activities = self.decode_graphs.run(batch)                  # [S, V]
        else:
            hidden, activities = self.model(*self._device_inputs(batch))        # [T, H]
            if len(rows) == hidden.shape[0]:   # decode-only: every row samples, no gather
                selected = hidden
            else:
                selected = hidden[self.staging.to_device("sample_rows", rows, torch.long)]
            logits = self.model.compute_logits(selected) if rows else None      # [S, V]
        result = RunnerOutput(sampled={})
        readback = StepReadback()   # the step's one device-to-host transfer
        sampled = None
        if rows:
            seqs = [item.seq for item in sample_items]
            self._mask_padded_vocab(logits)
            self._ban_early_stops(logits, seqs)
            apply_grammar_bitmasks(logits, seqs)   # structured outputs: constrained rows only
            tensors = self._sampling_tensors(seqs, logits.shape[1])
            penalised = tensors.repetition is not None or tensors.frequency is not None \
                or tensors.presence is not None
            sampled = self.sampler.sample(logits, [s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                                          [s.output_token_ids for s in seqs], [self._generator(s) for s in seqs],
                                          tensors=tensors,
                                          token_stats=self.token_counts.rows(seqs) if penalised else None)
            if penalised:
                self.token_counts.record(seqs, sampled.token_ids)
            sample_handles = sampled.register(readback)
        activity_handles = register_activity(activities, readback)
        host = readback.fetch()
        if sampled is not None:
            output = sampled.output(host, sample_handles)
            for seq, token_id, logprob in zip(seqs, output.token_ids, output.logprobs):
                result.sampled[seq.seq_id] = token_id
                if logprob is not None:
                    result.logprobs[seq.seq_id] = logprob
        apply_activity(host, activity_handles, activities, [item.seq.seq_id for item in sample_items], rows,
                       self.arch.intermediate_size, result)
        return result

    def _sampling_tensors(self, seqs, vocab_size: int) -> SamplingTensors:
        """Rebuilt only when the batch (its ordered sequence ids) changes."""
        key = tuple(seq.seq_id for seq in seqs)
        if key != self._sampling_key:
            self._sampling = SamplingTensors.build([seq.params for seq in seqs], vocab_size, self.device)
            self._sampling_key = key
        return self._sampling

    def _mask_padded_vocab(self, logits: torch.Tensor) -> None:
        """Embedding rows past the tokenizer (TurboSparse pads 32002 tokens to 32064) have no
        text: they are never sampled."""
        if self.num_text_tokens is not None and self.num_text_tokens < logits.shape[1]:
            logits[:, self.num_text_tokens:] = float("-inf")

    def _ban_early_stops(self, logits: torch.Tensor, seqs) -> None:
        """Below min_tokens, EOS and stop tokens cannot be sampled at all (as in vLLM), so the
        output never contains a stop token that did not stop it."""
        for row, seq in enumerate(seqs):
            params = seq.params
            if seq.num_output_tokens < params.min_tokens:
                banned = list(params.stop_token_ids) + ([] if params.ignore_eos else list(self.eos_token_ids))
                if banned:
                    logits[row, banned] = float("-inf")
