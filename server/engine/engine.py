"""The engine: one thread owns the model and loops `step()`: schedule() -> run -> process -> update_from_output().

Asyncio handlers submit jobs and read typed events from an asyncio.Queue per request.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from model.kv_cache import PagedKVCache
from model.step import TokenBatch
from server.engine.output import OutputProcessor
from server.engine.outputs import RunnerOutput, SchedulerOutput, ScoreChunk
from server.engine.preemption import make_room
from server.engine.prefix_cache import PrefixCache
from server.engine.requests import Job, Outbox, Unavailable
from server.engine.runner import FaultInjector, ModelRunner
from server.engine.scheduler import Scheduler, SchedulerLimits, StepStats
from server.engine.turns import DeviceTurns
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("server.engine")
MAX_AUTO_BATCH = 256


@dataclass
class EngineStatus:
    ready: bool
    draining: bool
    failed: bool
    waiting_generate: int
    waiting_score: int
    running: int
    scoring: int
    max_batch_size: int
    budget_tokens: int
    kv_used_bytes: int
    kv_budget_bytes: int
    retry_after: int
    cut_requests: int


def auto_batch_cap(model: torch.nn.Module, budget: int) -> int:
    """`--max-batch-size 0`: sequences the budget holds at full length in the layers every token attends
    in (all of the baseline's, CHIAR's full-attention ones); the routed cache is left to admission, so
    the cap never hides CHIAR's smaller cache (at most MAX_AUTO_BATCH)."""
    per_seq = max(model.kv_bytes_per_token(always=True), 1) * model.config.max_seq_len
    return max(1, min(MAX_AUTO_BATCH, int(budget // per_seq)))


@dataclass
class StepReport:
    """What one `Engine.step()` did (benchmarks read it)."""

    decode_tokens: int
    chunk_tokens: int
    forward_seconds: float
    seconds: float


class Engine:
    """Continuous batching around one ChiarLM: decode first, then budgeted prefill and scoring chunks.

    A server with several models runs one Engine per model; they share the device through `turns`
    (one step per turn, FIFO) and split `--kv-cache-mb` (`kv_cache_mb` is this engine's share)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, settings: Settings, metrics: Metrics, *,
                 name: str | None = None, kv_cache_mb: float | None = None, turns: DeviceTurns | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.name = name or settings.served_model_name
        self.metrics = metrics.for_model(self.name, model.config.n_layers)
        self.turns = turns or DeviceTurns()
        self.config = model.config
        self.device = next(model.parameters()).device
        per_token = model.kv_bytes_per_token()
        budget = int((settings.kv_cache_mb if kv_cache_mb is None else kv_cache_mb) * 2**20)
        max_batch = settings.max_batch_size or auto_batch_cap(model, budget)
        # the cache is a fixed pool of the budget's blocks, cached prefixes included: used KV never exceeds
        # the limit; when the running sequences outgrow it the engine preempts (`_make_room`)
        blocks = max(1, budget // PagedKVCache.bytes_per_block(model))
        cache = PagedKVCache.for_model(model, rows=max_batch, blocks=blocks, growable=False)
        self.scheduler = Scheduler(SchedulerLimits(
            max_batch_size=max_batch, queue_size=settings.queue_size, max_step_tokens=settings.max_tokens_per_step,
            step_target_seconds=settings.step_target_ms / 1000.0, kv_budget_bytes=budget, kv_bytes_per_token=per_token,
            max_seq_len=self.config.max_seq_len, kv_rounding_bytes=model.attention_layers() * PagedKVCache.bytes_per_block(model),
            score_stretch=settings.score_stretch))
        faults = FaultInjector.parse(settings.fault_inject)
        model.set_kernels(settings.kernels)
        model.kernels.freeze()  # served weights never change: no per-step check for edited weights
        self.runner = ModelRunner(model, cache, faults, PrefixCache(model, cache) if settings.prefix_cache else None,
                                  settings.serial_below)
        self.scheduler.prefix = self.runner  # rows are taken at admission, from the prefix cache where it has them
        self.preemptions = 0
        self.output = OutputProcessor(tokenizer, self.config.max_seq_len, self.config.eos_token_id, self.metrics, faults,
                                      lambda cost: cost.price(model))
        self._cv = threading.Condition()
        self._ready = threading.Event()
        self._draining = False
        self._drain_deadline: float | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._record = True
        self.fatal: BaseException | None = None
        self.cut_requests = 0
        self.outbox = Outbox()

    # ------------------------------------------------------------------ control (any thread)
    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._draining and self.fatal is None

    def status(self) -> EngineStatus:
        with self._cv:
            s = self.scheduler.status()
        return EngineStatus(ready=self.ready, draining=self._draining, failed=self.fatal is not None,
                            waiting_generate=s.waiting_generate, waiting_score=s.waiting_score, running=s.running + s.prefilling,
                            scoring=s.scoring, max_batch_size=self.scheduler.limits.max_batch_size, budget_tokens=s.budget_tokens,
                            kv_used_bytes=self.runner.kv_used_bytes(), kv_budget_bytes=s.kv_budget_bytes,
                            retry_after=s.retry_after, cut_requests=self.cut_requests)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"chiar-engine-{self.name}", daemon=True)
        self._thread.start()

    def begin_drain(self) -> None:
        """Stop admitting; in-flight requests get until the drain timeout, then a 503 / SSE error."""
        with self._cv:
            if not self._draining:
                self._draining = True
                self._drain_deadline = time.perf_counter() + self.settings.drain_timeout
            self._cv.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        self.begin_drain()
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + 5.0)

    def retry_after(self) -> int:
        with self._cv:
            return self.scheduler.retry_after()

    def kv_needed(self, tokens: int) -> tuple[int, int, float]:
        """(KV bytes a sequence of `tokens` tokens would hold at the measured share, the budget, the share)."""
        with self._cv:
            return self.scheduler.kv_needed(tokens), self.scheduler.limits.kv_budget_bytes, self.scheduler.kv_share

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs atomically, or raise Unavailable (503 + Retry-After)."""
        with self._cv:
            if self._draining:
                raise Unavailable("server is shutting down", retry_after=5)
            if self.fatal is not None or not self._ready.is_set():
                raise Unavailable("model is not ready yet", retry_after=2)
            self.scheduler.add(jobs)
            for job in jobs:
                job.outbox = self.outbox
            self._cv.notify_all()
        self._update_gauges()

    def cancel(self, jobs: list[Job], reason: str = "cancelled") -> None:
        """Mark jobs cancelled; the engine frees their slots at the next step."""
        with self._cv:
            for job in jobs:
                if not job.done and job.cancel_reason is None:
                    job.cancel_reason = reason
            self._cv.notify_all()

    # ------------------------------------------------------------------ engine thread
    def _main(self) -> None:
        try:
            torch.set_grad_enabled(False)
            if self.settings.warmup:
                with self.turns.turn():  # alone on the device: the warm-up timings seed the cost model
                    self._warmup()
        except BaseException as exc:
            log.exception("warm-up failed")
            self.fatal = exc
            return
        self._ready.set()
        log.info("engine %r ready on %s (batch cap %d, %s kernels)", self.name, self.device, self.scheduler.limits.max_batch_size,
                 self.model.kernels.name)
        while True:
            with self._cv:
                while not (self.scheduler.has_work or self._stopping):
                    self._cv.wait()
                if self._stopping and not self.scheduler.has_work:
                    break
            with self.turns.turn():  # one step per turn: engines of other models alternate with this one
                with self._cv:
                    if self._drain_deadline is not None and time.perf_counter() > self._drain_deadline:
                        self._cut_all()
                        self.outbox.flush()
                    if not self.scheduler.has_work:
                        continue
                self.step()
            self.outbox.flush()

    def _cut_all(self) -> None:
        """The drain timed out: every in-flight request gets a 'shutdown' error."""
        jobs = [j for j in self.scheduler.all_jobs() if not j.done]
        for job in jobs:
            job.fail("shutdown", "the server shut down before the request finished")
        self.cut_requests += len(jobs)
        if jobs:
            log.error("drain timed out: %d requests cut", len(jobs))
        self.scheduler.drop(jobs)
        self.runner.release(jobs)

    def _fail_step(self, out: SchedulerOutput, message: str) -> None:
        jobs: list[Job] = [*out.decode, *(c.job for c in out.prefill), *(c.job for c in out.score)]
        for job in jobs:
            job.fail("internal", message)
        with self._cv:
            self.scheduler.drop(jobs)
        self.runner.release(jobs)

    def step(self) -> StepReport | None:
        """One engine step: schedule, one forward, sampling and outputs, then the scheduler learns.
        A bug outside the per-request guards fails what the step touched, not the engine."""
        with self._cv:
            if not self.scheduler.has_work:
                return None
            out = self.scheduler.schedule(time.perf_counter())
            self.preemptions += make_room(self.scheduler, self.runner, out)
        t0 = time.perf_counter()
        try:
            ro = self._run(out)
        except Exception as exc:
            log.error("engine step failed: %s", type(exc).__name__)
            log.debug("traceback", exc_info=True)
            self._fail_step(out, f"internal error: {type(exc).__name__}")
            return None
        seconds = time.perf_counter() - t0
        if self._record:
            self.metrics.record_step(len(ro.decode), sum(len(p.tokens) for p in ro.prefill), sum(len(p.tokens) for p in ro.score),
                                     out.budget, seconds, self.runner.kv_used_bytes(), self.scheduler.limits.kv_budget_bytes)
            prefix = self.runner.prefix
            self.metrics.record_prefix(self.runner.stats.queries, self.runner.stats.hits, prefix.evicted if prefix else 0,
                                       prefix.cached_bytes if prefix else 0, prefix.cached_tokens if prefix else 0, self.preemptions)
        self._update_gauges()
        return StepReport(len(ro.decode), ro.tokens - len(ro.decode), ro.seconds, seconds)

    def _run(self, out: SchedulerOutput) -> RunnerOutput:
        for job, reason in out.expired:
            job.fail(reason, f"request {reason}" + ("" if job.admitted else " while waiting"))
        self.runner.release([j for j, _ in out.expired])
        for reuse in out.reused:  # outputs of cached prefixes come first, in order
            self.output.book_reuse(reuse)
        bad = [r.job for r in out.reused if r.job.done]
        for job in bad:
            out.drop(job, None)
        self.runner.release(bad)
        if self._record:
            for job in [*(c.job for c in out.prefill), *(c.job for c in out.score)]:
                if not job.wait_recorded and job.admitted is not None:
                    job.wait_recorded = True
                    self.metrics.queue_wait.observe(job.admitted - job.arrival)
        ro = self.runner.run(out)
        self._record_forward(ro)
        ended, started = self.output.process(ro)
        ended += self.output.score_nothing(self.scheduler.scoring)  # they get no chunk, so nothing else ends them
        for part in ro.score:
            chunk = part.chunk
            assert isinstance(chunk, ScoreChunk)
            if chunk.last:
                self.runner.release_window(chunk.job, chunk.window.index)
        self.runner.release(ended)
        ended += bad
        with self._cv:
            self.scheduler.update_from_output(out, ro, ended, started, self.runner.kv_held_bytes(), self.runner.kv_tokens())
        return ro

    def _update_gauges(self) -> None:
        # every step: only the counts the gauges show, not status()'s backlog and KV sums
        sched = self.scheduler
        with self._cv:
            waiting_generate, waiting_score = sched.waiting_counts()
            active = len(sched.prefilling) + len(sched.running) + len(sched.scoring)
            budget = sched.budget()
        self.metrics.update_queues(waiting_generate, waiting_score, active, budget)

    def _record_forward(self, ro: RunnerOutput) -> None:
        """The step's forward: a forward that carries prompt or scoring tokens counts as prefill."""
        if not self._record or not ro.tokens:
            return
        chunks = len(ro.prefill) + len(ro.score)
        phase, batch = ("prefill", chunks) if chunks else ("decode", len(ro.decode))
        self.metrics.record_forward(phase, ro.seconds, batch, ro.counts, ro.gate, ro.executed_flops, ro.dense_flops)

    def _warmup(self) -> None:
        """A prompt, a chunk and decode steps through the real cache; their timings seed the cost model."""
        self._record = False
        self.output.record = False
        cache, model = self.runner.cache, self.model
        try:
            n = min(64, self.config.max_seq_len - 8)
            while n > 4 and sum(cache.blocks_needed([(None, n + 3), (None, 7)])) > cache.n_blocks:  # a small pool: a shorter prompt
                n -= 1
            ids = [(3 + i) % (self.config.vocab_size - 1) for i in range(n)]
            rows = [cache.allocate() for _ in range(2)]
            for _ in range(2):  # the second round's timings count (the first pays for first-call costs)
                for row in rows:
                    cache.free(row)
                rows = [cache.allocate() for _ in range(2)]
                t0 = time.perf_counter()
                out = model.forward_step(TokenBatch.build(cache, [(rows[0], ids)], [n - 1], self.device), cache)
                long = time.perf_counter() - t0
                t0 = time.perf_counter()
                model.forward_step(TokenBatch.build(cache, [(rows[1], ids[:4])], [3], self.device), cache)
                short = time.perf_counter() - t0
                t0 = time.perf_counter()
                for token in range(3):
                    model.forward_step(TokenBatch.build(cache, [(row, [token]) for row in rows], None, self.device), cache)
                decode = (time.perf_counter() - t0) / 3
            cost = self.scheduler.cost
            cost.observe(StepStats(0, n, long))
            cost.observe(StepStats(0, 4, short))
            cost.observe(StepStats(2, 0, decode))
            # first estimate of the attending share (admission's estimate until steps measure it)
            seen = float(n + 3) * self.scheduler.limits.kv_bytes_per_token
            self.scheduler.kv_share = min(1.0, max(0.05, cache.entry_bytes([rows[0]]) / seen))
            del out
            for row in rows:
                cache.free(row)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            self._record = True
            self.output.record = True
