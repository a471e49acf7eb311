"""The engine: one thread owns the model and loops `EngineCore.step()`; request handlers submit jobs,
cancel them and read typed events from an asyncio.Queue per request (vLLM v1's EngineCoreProc shape).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from server.engine.core import MAX_AUTO_BATCH, EngineCore, StepReport, auto_batch_cap
from server.engine.requests import Job, Outbox, Unavailable
from server.engine.turns import DeviceTurns
from server.metrics import Metrics
from server.settings import Settings

__all__ = ["MAX_AUTO_BATCH", "Engine", "EngineStatus", "StepReport", "auto_batch_cap"]

log = logging.getLogger("server.engine")


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


class Engine(EngineCore):
    """An EngineCore with its thread: start, drain, stop, and the calls request handlers make."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, settings: Settings, metrics: Metrics, *,
                 name: str | None = None, kv_cache_mb: float | None = None, turns: DeviceTurns | None = None) -> None:
        super().__init__(model, tokenizer, settings, metrics, name=name, kv_cache_mb=kv_cache_mb, turns=turns)
        self._ready = threading.Event()
        self._draining = False
        self._drain_deadline: float | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
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
        self.cut_requests += len(jobs)
        if jobs:
            log.error("drain timed out: %d requests cut", len(jobs))
        self._fail(jobs, "shutdown", "the server shut down before the request finished")
