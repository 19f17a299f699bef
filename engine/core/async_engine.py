"""Async front of the engine: one background task steps the core; per-request queues.

Model steps run in one dedicated worker thread so the event loop keeps serving HTTP while the
model computes. NOTE: always the same thread, not asyncio.to_thread's pool: the OpenMP runtime
keeps a team of worker threads per calling thread, and steps alternating between pool threads
left the idle team spinning on a core the active one needed: on the 2-core host, int8 SmolLM2
at 1 client, 16.7 ms between tokens with the pool, 10.2 ms with one thread
(docs/benchmarks/serving.md). Adds and aborts are applied by the loop between steps, never during
one, so the core is only ever touched by one thread at a time.

No single request takes the engine down: a step that raises fails the requests of its batch
(RequestFailedError, their blocks freed) and the others go on. Only MAX_STEP_FAILURES failed
steps in a row, or a failure outside a step, stop the engine for good (`dead_reason` is then
set, /health answers 503 and every request still open fails with EngineDeadError).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.engine.core.errors import EngineDeadError, EngineOverloadedError, RequestFailedError, StepFailedError
from sparse_serve.engine.core.input_processor import EngineRequest, InputProcessor
from sparse_serve.engine.core.llm_engine import LLMEngine
from sparse_serve.engine.core.outputs import EngineStats, RequestOutput, StepStats
from sparse_serve.engine.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# NOTE: one failed step is the batch's problem (a request the checks missed); several in a row,
# each with other requests, is the engine's (a device or a bug): stop and let /health say so.
MAX_STEP_FAILURES = 3


class AsyncEngine:
    def __init__(self, core: LLMEngine):
        self.core = core
        self.config = core.config
        # NOTE: a tokenizer of its own: the core's is used by the step thread (detokenizing).
        tokenizer = Tokenizer.from_pretrained(core.model_path, core.config.model.chat_template)
        self.processor = InputProcessor(tokenizer, core.max_model_len)
        self.model_name = core.model_name
        self.max_model_len = core.max_model_len
        self.total_params = core.accounting.total_params
        self.num_layers = core.arch.num_layers
        self.step_listeners: list[Callable[[StepStats], None]] = []
        # every request's final output (stats set), aborted ones included: their consumer may
        # be gone (a client that disconnected), so this is where finished requests are counted
        self.request_listeners: list[Callable[[RequestOutput], None]] = []
        # called once, with dead_reason, when the engine stops for good
        self.death_listeners: list[Callable[[str], None]] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_adds: list[EngineRequest] = []
        self._pending_aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._step_failures = 0          # in a row
        self.num_step_failures = 0       # since start
        self._step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        """Loads the model: slow and blocking (call it in a thread from async code)."""
        path = config.model.path
        if path is None:
            from sparse_serve.engine.checkpoints.default_model import DEFAULT_MODEL_NAME, default_model_path
            path = config.model.path = str(default_model_path())
            # NOTE: served as "SmolLM2-135M-Instruct" (what the README's examples send), not
            # as its cache folder's name, which carries a key that changes with the conversion
            config.model.served_model_name = config.model.served_model_name or DEFAULT_MODEL_NAME
            logger.info("no model path given; serving the embedded default model at %s as %s",
                        path, config.model.served_model_name)
        return cls(LLMEngine(config, path))

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.create_task(self._run_loop(), name="engine-loop")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        self.processor.close()
        self._step_thread.shutdown(wait=False)

    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    @property
    def dead_reason(self) -> str | None:
        return None if self._dead is None else repr(self._dead)

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Trusts `request` (built by self.processor); refuses before its first yield."""
        if self._dead is not None:
            raise EngineDeadError(f"engine loop stopped: {self._dead!r}")
        request_id = request.request_id
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id!r}")
        waiting = self.core.scheduler.num_waiting + len(self._pending_adds)
        if waiting >= self.config.scheduler.max_queued_requests:
            raise EngineOverloadedError(f"the server is overloaded: {waiting} requests are already waiting")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._pending_adds.append(request)
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:   # consumer went away (GeneratorExit / CancelledError) or error
                self._abort_soon(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_soon(request_id)

    def _abort_soon(self, request_id: str) -> None:
        if request_id in self._queues:
            self._pending_aborts.append(request_id)
            if self._wakeup is not None:
                self._wakeup.set()

    def get_stats(self) -> EngineStats:
        stats = self.core.get_stats()
        stats.num_waiting += len(self._pending_adds)
        stats.num_step_failures = self.num_step_failures
        stats.dead = self._dead is not None
        return stats

    # ---- the loop -------------------------------------------------------------------------
    def _apply_pending(self) -> None:
        adds, self._pending_adds = self._pending_adds, []
        for request in adds:
            try:
                self.core.add_request(request)
            except Exception as exc:   # validated already; anything left is the request's own fault
                self._deliver(request.request_id, exc)
        aborts, self._pending_aborts = self._pending_aborts, []
        for request_id in aborts:
            self._end_request(request_id, "abort", None)

    def _end_request(self, request_id: str, reason: str, error: BaseException | None) -> None:
        """Abort `request_id` in the core (freeing its blocks), report its final output to the
        listeners, and hand its consumer that output, or `error` in its place."""
        try:
            out = self.core.abort_request(request_id, reason)
        except Exception:   # NOTE: its state may be what broke; its consumer hears of it regardless
            logger.exception("could not release request %s", request_id)
            out = None
        queue = self._queues.pop(request_id, None)
        if out is not None:
            out.finished = True
            for listener in self.request_listeners:
                _call_safely(listener, out)
        if queue is not None and (error is not None or out is not None):
            queue.put_nowait(error if error is not None else out)

    def _fail_step(self, exc: StepFailedError) -> None:
        self._step_failures += 1
        self.num_step_failures += 1
        logger.error("engine step failed (%d in a row); failing requests %s", self._step_failures,
                     exc.request_ids, exc_info=exc.__cause__)
        error = RequestFailedError(f"the request failed inside an engine step: {exc.__cause__!r}")
        for request_id in exc.request_ids:
            self._end_request(request_id, "error", error)
        if self._step_failures >= MAX_STEP_FAILURES:
            raise RuntimeError(f"{self._step_failures} engine steps failed in a row") from exc.__cause__

    def _deliver(self, request_id: str, item) -> None:
        queue = self._queues.get(request_id)
        if queue is None:
            return
        queue.put_nowait(item)
        if isinstance(item, BaseException) or item.finished:
            del self._queues[request_id]

    async def _run_loop(self) -> None:
        try:
            while True:
                self._apply_pending()
                if not self.core.has_unfinished():
                    self._wakeup.clear()
                    if not self._pending_adds and not self._pending_aborts:
                        await self._wakeup.wait()
                    continue
                try:
                    result = await asyncio.get_running_loop().run_in_executor(self._step_thread, self.core.step)
                except StepFailedError as exc:
                    self._fail_step(exc)
                    continue
                self._step_failures = 0
                for out in result.outputs:
                    if out.finished:
                        for listener in self.request_listeners:
                            _call_safely(listener, out)
                    self._deliver(out.request_id, out)
                if result.stats is not None:
                    for listener in self.step_listeners:
                        _call_safely(listener, result.stats)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:   # a bug or a device failure: fail every request loudly
            logger.exception("engine loop died")
            self._dead = exc
            error = EngineDeadError(f"engine loop stopped: {exc!r}")
            self._pending_adds.clear()
            for request_id in set(self._queues) | set(self.core.requests):
                self._end_request(request_id, "error", error)
            for listener in self.death_listeners:
                _call_safely(listener, self.dead_reason)


def _call_safely(fn, arg) -> None:
    try:
        fn(arg)
    except Exception:   # NOTE: a metrics bug must never stop the engine
        logger.exception("listener %r failed", fn)
