"""The only place where scheduled sequences become tensors.

`execute(SchedulerOutput)` builds token ids, positions, slot mapping and block tables, runs the
model, samples one token for each sequence that caught up with its tokens, and reads the FFN
activity counts back once per step, after the sampler's own read-back of the sampled ids.
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
from sparse_serve.engine.worker.activity import RunnerOutput, read_activity
from sparse_serve.engine.worker.huge_pages import huge_page_bytes, pack_on_huge_pages
from sparse_serve.engine.worker.sampler import Sampler, make_generator

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
        # NOTE: fused q/k/v projections (views, no extra memory): one GEMM per layer per step.
        for layer in model.model.layers:
            layer.self_attn.fuse_qkv()
        if self.device.type == "cpu":
            packed = pack_on_huge_pages(model)
            logger.info("weights packed into a huge-page arena: %.1f MiB", packed / 2**20)
        self.eos_token_ids: set[int] = set()   # set by the engine once EOS ids are known

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
        self.num_blocks = num_blocks

    # ---- per-sequence state ---------------------------------------------------------------
    def release(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    def _generator(self, seq) -> torch.Generator | None:
        if seq.seq_id not in self.generators:
            seed = seq.params.seed
            # NOTE: sibling choices (n > 1) must differ, so each gets seed + index.
            self.generators[seq.seq_id] = make_generator(None if seed is None else seed + seq.index, self.device)
        return self.generators[seq.seq_id]

    # ---- one step -------------------------------------------------------------------------
    def _prepare(self, out: SchedulerOutput):
        input_ids, positions, slots, query_lens, seq_lens, tables = [], [], [], [], [], []
        bs = self.block_size
        for item in out.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(item.num_new_tokens)
            seq_lens.append(end)
            tables.append(table)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        to = dict(device=self.device)
        meta = AttentionMetadata(
            query_lens=query_lens, seq_lens=seq_lens,
            slot_mapping=torch.tensor(slots, dtype=torch.long, **to),
            block_tables=torch.tensor(padded, dtype=torch.int32, **to),
            seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, **to),
            block_size=bs)
        return (torch.tensor(input_ids, dtype=torch.long, **to),
                torch.tensor(positions, dtype=torch.long, **to), meta)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        input_ids, positions, meta = self._prepare(out)
        shadow = self.shadow_rate > 0 and self._shadow_rng.random() < self.shadow_rate
        for mlp in self.model.mlps:
            mlp.shadow_check = shadow
        hidden, activities = self.model(input_ids, positions, meta)             # [T, H]

        # Rows whose next token we sample: the last new token of each caught-up sequence.
        sample_items, rows, row = [], [], -1
        for item in out.scheduled:
            row += item.num_new_tokens
            if item.samples:
                sample_items.append(item)
                rows.append(row)
        result = RunnerOutput(sampled={})
        if rows:
            if len(rows) == hidden.shape[0]:   # decode-only: every row samples, no gather
                selected = hidden
            else:
                selected = hidden[torch.tensor(rows, device=self.device)]
            logits = self.model.compute_logits(selected)                        # [S, V]
            seqs = [item.seq for item in sample_items]
            self._ban_early_stops(logits, seqs)
            sampled = self.sampler(logits, [s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                                   [s.output_token_ids for s in seqs], [self._generator(s) for s in seqs])
            for seq, token_id, logprob in zip(seqs, sampled.token_ids, sampled.logprobs):
                result.sampled[seq.seq_id] = token_id
                if logprob is not None:
                    result.logprobs[seq.seq_id] = logprob
        read_activity(activities, [item.seq.seq_id for item in sample_items], rows, positions.shape[0],
                      self.arch.intermediate_size, result)
        return result

    def _ban_early_stops(self, logits: torch.Tensor, seqs) -> None:
        """Below min_tokens, EOS and stop tokens cannot be sampled at all (as in vLLM), so the
        output never contains a stop token that did not stop it."""
        for row, seq in enumerate(seqs):
            params = seq.params
            if seq.num_output_tokens < params.min_tokens:
                banned = list(params.stop_token_ids) + ([] if params.ignore_eos else list(self.eos_token_ids))
                if banned:
                    logits[row, banned] = float("-inf")
