"""The synchronous engine core: one step is schedule -> execute -> update_from_output.

It owns the model runner, scheduler and request states. It is driven either by the async
engine's background loop (one step at a time, in a worker thread) or by the offline `LLM`.
Nothing here is thread-safe: callers never touch it while a step runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sparse_serve.engine.checkpoints.loader import load_model
from sparse_serve.engine.core.block_manager import BlockManager
from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.engine.core.errors import StepFailedError
from sparse_serve.engine.core.input_processor import EngineRequest
from sparse_serve.engine.core.outputs import EngineStats, RequestOutput, RequestStats, StepStats
from sparse_serve.engine.core.request_state import RequestState, make_logprob
from sparse_serve.engine.core.scheduler import Scheduler, SchedulerOutput
from sparse_serve.engine.core.sequence import Sequence
from sparse_serve.engine.core.sparsity import SparsityAccounting
from sparse_serve.engine.models.arch_config import ModelArchConfig
from sparse_serve.engine.models.llama import CausalLM
from sparse_serve.engine.text.detokenizer import IncrementalDetokenizer
from sparse_serve.engine.text.tokenizer import Tokenizer, load_eos_token_ids
from sparse_serve.engine.worker.model_runner import ModelRunner, kv_bytes_per_block

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    outputs: list[RequestOutput]
    stats: StepStats | None


class LLMEngine:
    def __init__(self, config: EngineConfig, model_path: str,
                 loaded: tuple[CausalLM, ModelArchConfig] | None = None):
        """model_path: the checkpoint folder (its tokenizer too). `loaded`: a model built in
        memory instead (bench/gpu_e2e.py's random full-size model); the folder then supplies
        only the tokenizer."""
        self.config = config
        self.model_path = str(model_path)
        self.model, self.arch = loaded if loaded is not None else load_model(config.model, model_path)
        self.tokenizer = Tokenizer.from_pretrained(self.model_path, config.model.chat_template)
        self.model_name = config.model.served_model_name or Path(self.model_path).name
        self.max_model_len = config.model.max_model_len or self.arch.max_position_embeddings
        self.eos_token_ids = load_eos_token_ids(self.model_path, self.tokenizer) | set(self.arch.eos_token_ids)
        self.accounting = SparsityAccounting.of_model(self.model)
        self.runner = ModelRunner(self.model, config)
        self.runner.eos_token_ids = self.eos_token_ids
        self.runner.num_text_tokens = self.tokenizer.vocab_size
        num_blocks = self.runner.profile_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        config.cache.num_blocks = num_blocks
        self.runner.init_decode_graphs(self.max_model_len)
        self.block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.eos_token_ids, self.max_model_len)
        self.requests: dict[str, RequestState] = {}
        per_block = kv_bytes_per_block(self.arch, config.cache.block_size, self.runner.dtype)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d, eos ids %s, "
                    "prefix caching %s", num_blocks, config.cache.block_size, num_blocks * per_block / 2**20,
                    self.max_model_len, sorted(self.eos_token_ids),
                    "on" if config.cache.enable_prefix_caching else "off")

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request: EngineRequest, arrival_time: float | None = None) -> None:
        """Trusts `request` (the input processor validated it, and its params are its own)."""
        request_id, prompt_token_ids, params = request.request_id, request.prompt_token_ids, request.params
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        arrival = arrival_time or time.time()
        seqs = [Sequence(request_id, i, list(prompt_token_ids), params, arrival) for i in range(params.n)]
        detoks = [IncrementalDetokenizer(self.tokenizer.hf, prompt_token_ids, params) for _ in seqs]
        state = RequestState(request_id, list(prompt_token_ids), seqs, detoks,
                             RequestStats(arrival_time=arrival, num_prompt_tokens=len(prompt_token_ids)))
        for seq in seqs:
            self.scheduler.add_sequence(seq)
        self.requests[request_id] = state

    def abort_request(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        """End a request now, freeing its blocks; its last output carries `reason` ("abort",
        or "error" for a request whose step failed)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in self.scheduler.abort_request(request_id, reason):
            self.runner.release(seq.seq_id)
            state.delta(seq.index).finish_reason = reason
        return state.take_output(self.accounting)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> StepResult:
        """One step. If anything after scheduling raises, StepFailedError names the requests
        of the step's batch (the caller fails those alone; their state is not trusted)."""
        started = time.perf_counter()
        sched = self.scheduler.schedule()
        try:
            return self._run(sched, started)
        except Exception as exc:
            seqs = [item.seq for item in sched.scheduled] + sched.finished
            raise StepFailedError(sorted({seq.request_id for seq in seqs})) from exc

    def _run(self, sched: SchedulerOutput, started: float) -> StepResult:
        now = time.time()
        for item in sched.scheduled:
            stats = self.requests[item.seq.request_id].stats
            if stats.scheduled_time is None:
                stats.scheduled_time = now
        num_prefill = sum(i.num_new_tokens for i in sched.scheduled if i.seq.num_output_tokens == 0
                          or i.num_new_tokens > 1)
        run = self.runner.execute(sched) if sched.scheduled else None
        finished = self.scheduler.update_from_output(sched, run.sampled if run else {})
        if run is not None:
            # what the step read, as its kernels reported (engine/core/sparsity.py)
            reads = (run.num_rows_read, run.num_predictor_params_read)
            read_params, read_bytes = self.accounting.computed_params(*reads), self.accounting.read_bytes(*reads)
            finished += self._record(sched, run, read_params, read_bytes, time.time())
        for seq in finished:
            self._finish(seq)
        outputs = self._collect_outputs()
        if run is None:
            return StepResult(outputs, None)
        step_stats = StepStats(
            duration_s=time.perf_counter() - started, num_seqs=len(sched.scheduled),
            num_prefill_tokens=num_prefill, num_decode_tokens=sched.num_batched_tokens - num_prefill,
            num_generated_tokens=len(run.sampled), num_preempted=len(sched.preempted),
            per_layer_active_fraction=run.per_layer_active_fraction,
            per_layer_computed_fraction=run.per_layer_computed_fraction,
            read_params=read_params, read_bytes=read_bytes, dense_bytes=self.accounting.dense_bytes,
            predictor_recall=run.predictor_recall, predictor_precision=run.predictor_precision)
        return StepResult(outputs, step_stats)

    def _record(self, sched, run, read_params: int, read_bytes: int, now: float) -> list[Sequence]:
        """Charge each sequence its share of the step's reads (by tokens), account and detokenize
        every sampled token; returns sequences a stop string ended."""
        stopped = []
        for item in sched.scheduled:
            seq = item.seq
            token_id = run.sampled.get(seq.seq_id)
            state = self.requests.get(seq.request_id)
            if state is not None:
                state.charge_step(item.num_new_tokens, sched.num_batched_tokens, read_params, read_bytes)
            if token_id is None or state is None:
                continue
            raw = run.logprobs.get(seq.seq_id)
            logprob = make_logprob(self.tokenizer, token_id, raw) if raw is not None else None
            state.record_token(seq, token_id, run.num_active[seq.seq_id], read_params,
                               run.computed_fraction, self.accounting, logprob, now)
            text, stop = state.detokenizers[seq.index].add_tokens([token_id])
            state.delta(seq.index).text += text
            if stop is None:
                continue
            if seq.is_finished:   # a token rule fired on the same token: the stop string wins
                seq.finish_reason, seq.stop_reason = "stop", stop
            else:
                self.scheduler.finish_sequence(seq, "stop", stop)
                stopped.append(seq)
        return stopped

    def _finish(self, seq: Sequence) -> None:
        state = self.requests.get(seq.request_id)
        if state is None:
            return
        delta = state.delta(seq.index)
        detok = state.detokenizers[seq.index]
        if detok.stop_match is None:
            delta.text += detok.flush()
        delta.finish_reason, delta.stop_reason = seq.finish_reason, seq.stop_reason
        self.runner.release(seq.seq_id)

    def _collect_outputs(self) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self.requests):
            state = self.requests[request_id]
            out = state.take_output(self.accounting)
            if out is not None:
                outputs.append(out)
            if state.finished:
                del self.requests[request_id]
        return outputs

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           num_total_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks, block_size=bm.block_size,
                           kv_cache_usage=bm.usage, num_preemptions=self.scheduler.num_preemptions,
                           prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits)
