"""The engine's core: one model's scheduler, runner and output processor, and `step()`:
schedule() -> one forward -> sampling and outputs -> update_from_output() (vLLM v1's EngineCore).

The thread that loops it and the requests' control surface are server/engine/engine.py.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from model.kv_cache import PagedKVCache
from server.engine.output import OutputProcessor
from server.engine.outputs import RunnerOutput, SchedulerOutput, ScoreChunk
from server.engine.preemption import make_room
from server.engine.prefix_cache import PrefixCache
from server.engine.requests import Job
from server.engine.runner import FaultInjector, ModelRunner
from server.engine.scheduler import Scheduler, SchedulerLimits
from server.engine.turns import DeviceTurns
from server.engine.warmup import warm_up
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("server.engine")
MAX_AUTO_BATCH = 256


def smallest_sequence_bytes(model: torch.nn.Module) -> int:
    """KV bytes of one block in each attending layer: the least a sequence holds, and the partly filled
    last blocks admission adds to every reservation."""
    return model.attention_layers() * PagedKVCache.bytes_per_block(model)


def auto_batch_cap(model: torch.nn.Module, budget: int) -> int:
    """`--max-batch-size 0`: sequences the budget can hold at all (one block in each attending layer), at
    most MAX_AUTO_BATCH. The KV each request will need is admission's to count (its own prompt and new
    tokens at the measured attending share, preemption beyond): a cap at full-context sequences held
    the baseline to 21 of 32 short requests at 512 MiB and cost it a third of its tokens/s."""
    per_seq = max(smallest_sequence_bytes(model), 1)
    return max(1, min(MAX_AUTO_BATCH, int(budget // per_seq)))


@dataclass
class StepReport:
    """What one `Engine.step()` did (benchmarks read it)."""

    decode_tokens: int
    chunk_tokens: int
    forward_seconds: float
    seconds: float


class EngineCore:
    """Continuous batching around one ChiarLM: decode first, then budgeted prefill and scoring chunks.

    A server with several models runs one engine per model; they share the device through `turns`
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
        # the limit; when the running sequences outgrow it the engine preempts (server/engine/preemption.py)
        blocks = max(1, budget // PagedKVCache.bytes_per_block(model))
        cache = PagedKVCache.for_model(model, rows=max_batch, blocks=blocks, growable=False)
        self.scheduler = Scheduler(SchedulerLimits(
            max_batch_size=max_batch, queue_size=settings.queue_size, max_step_tokens=settings.max_tokens_per_step,
            step_target_seconds=settings.step_target_ms / 1000.0, kv_budget_bytes=budget, kv_bytes_per_token=per_token,
            max_seq_len=self.config.max_seq_len, kv_rounding_bytes=smallest_sequence_bytes(model),
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
        self._cv = threading.Condition()  # guards the scheduler: the engine thread and request handlers share it

    def _fail(self, jobs: list[Job], reason: str, message: str) -> None:
        """End `jobs` with an error event; their queue places and cache rows are freed."""
        for job in jobs:
            job.fail(reason, message)
        with self._cv:  # re-entrant: _cut_all calls it holding the lock
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
            self._fail([*out.decode, *(c.job for c in out.prefill), *(c.job for c in out.score)], "internal",
                       f"internal error: {type(exc).__name__}")
            return None
        seconds = time.perf_counter() - t0
        if self.metrics.recording:
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
        if self.metrics.recording:
            for job in [*(c.job for c in out.prefill), *(c.job for c in out.score)]:
                if not job.wait_recorded and job.admitted is not None:
                    job.wait_recorded = True
                    self.metrics.queue_wait.observe(job.admitted - job.arrival)
        ro = self.runner.run(out)
        self._record_forward(ro)
        ended, started = self.output.process(ro)
        ended += self.output.scoring.score_nothing(self.scheduler.scoring)  # they get no chunk, so nothing else ends them
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
        if not self.metrics.recording or not ro.tokens:
            return
        chunks = len(ro.prefill) + len(ro.score)
        phase, batch = ("prefill", chunks) if chunks else ("decode", len(ro.decode))
        self.metrics.record_forward(phase, ro.seconds, batch, ro.counts, ro.gate, ro.executed_flops, ro.dense_flops)

    def _warmup(self) -> None:
        """Warm-up steps through the real cache (server/engine/warmup.py), not counted in the metrics."""
        self.metrics.recording = False
        try:
            warm_up(self.model, self.runner.cache, self.scheduler, self.device)
        finally:
            self.metrics.recording = True
