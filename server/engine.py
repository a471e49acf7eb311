"""The model worker: one thread owns the model and runs continuous batching.

Each step: drop cancelled or timed-out sequences (DecodeState.select), decode one token for
every running sequence, admit waiting requests within the batch and token budget (prefill, then
DecodeState.concat into the running batch), and score perplexity windows with `model.infer`.
Asyncio handlers submit jobs and receive events through an asyncio.Queue per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer

from model import DecodeState, make_generator, sample_next
from server.metrics import Metrics
from server.settings import Settings
from server.textstream import TextStream, TokenStrings

log = logging.getLogger("server.engine")


class Unavailable(Exception):
    """The engine cannot take the request now (queue full, warming up, draining)."""

    def __init__(self, message: str, retry_after: int, reason: str = "overloaded") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


@dataclass
class GenParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: None = none, n = sampled token + top n
    prompt_logprobs: int | None = None  # same for the prompt tokens (echo)
    return_routing: bool = False


class Job:
    """A unit of work for the worker; events go to an asyncio.Queue on the caller's loop."""

    def __init__(self, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop, index: int, timeout: float) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.queue = queue
        self.loop = loop
        self.index = index
        self.arrival = time.perf_counter()
        self.deadline = self.arrival + timeout
        self.admitted: float | None = None
        self.cancel_reason: str | None = None
        self.done = False

    def post(self, event: dict[str, Any]) -> None:
        event["index"] = self.index
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone (shutdown)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def fail(self, reason: str, message: str) -> None:
        if not self.done:
            self.done = True
            self.post({"type": "error", "reason": reason, "message": message})


class GenerateJob(Job):
    def __init__(self, prompt_ids: list[int], params: GenParams, **kw: Any) -> None:
        super().__init__(**kw)
        self.prompt_ids = prompt_ids
        self.params = params
        self.tokens: list[int] = []
        self.token_logprobs: list[dict[str, Any]] = []
        self.prompt_logprobs: list[dict[str, Any]] | None = None
        self.routing: dict[str, list] | None = None
        self.flops = [0.0, 0.0]
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None


@dataclass
class Window:
    seq: int  # index into the job's sequences
    begin: int  # first input position
    end: int  # inputs are ids[begin:end], targets ids[begin+1:end+1]
    score_from: int  # first target index (into ids) this window scores


class ScoreJob(Job):
    """Log-likelihood of each token of each sequence (BOS first), sliding windows beyond the context."""

    def __init__(self, seqs: list[list[int]], window: int, stride: int, top_n: int | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.seqs = seqs
        self.top_n = top_n
        self.logprobs = [[0.0] * (len(ids) - 1) for ids in seqs]
        self.top: list[list[dict[int, float] | None]] | None = [[None] * (len(ids) - 1) for ids in seqs] if top_n else None
        self.counts: list[torch.Tensor | None] = [None] * len(seqs)
        self.n_windows = [0] * len(seqs)
        self.pending: deque[Window] = deque()
        for s, ids in enumerate(seqs):
            last_input = len(ids) - 1  # ids[-1] is only ever a target
            begin, scored = 0, 0
            while True:
                end = min(begin + window, last_input)
                self.pending.append(Window(s, begin, end, scored + 1))
                self.n_windows[s] += 1
                scored = end
                if end >= last_input:
                    break
                begin += stride
        self.remaining = len(self.pending)


def window_plan(n_tokens: int, window: int, stride: int) -> int:
    """Number of windows a text of n tokens (BOS excluded) needs."""
    if n_tokens <= window:
        return 1
    return 1 + math.ceil((n_tokens - window) / stride)


class Engine:
    """Continuous-batching worker around one ChiarLM."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, settings: Settings, metrics: Metrics) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics
        self.config = model.config
        self.device = next(model.parameters()).device
        self.token_str = TokenStrings(tokenizer)
        self.eos = self.config.eos_token_id
        self.pad = self.config.pad_token_id
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[GenerateJob] = []
        self._state: DecodeState | None = None
        self._scoring: list[ScoreJob] = []
        self._ready = threading.Event()
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._service_ema = 1.0
        self.fatal: BaseException | None = None
        self._record = True

    # ------------------------------------------------------------ control (any thread)
    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._draining and self.fatal is None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="chiar-engine", daemon=True)
        self._thread.start()

    def begin_drain(self) -> None:
        """Stop admitting new requests; running and waiting ones finish."""
        with self._cv:
            self._draining = True

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._draining = True
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def retry_after(self) -> int:
        per_slot = self._service_ema * (len(self._waiting) + 1) / self.settings.max_batch_size
        return max(1, min(60, math.ceil(per_slot)))

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs atomically, or raise Unavailable (503 + Retry-After)."""
        with self._cv:
            if self._draining:
                raise Unavailable("server is shutting down", retry_after=5, reason="overloaded")
            if self.fatal is not None or not self._ready.is_set():
                raise Unavailable("model is not ready yet", retry_after=2, reason="overloaded")
            if self._waiting and len(self._waiting) + len(jobs) > self.settings.queue_size:
                raise Unavailable(f"queue is full ({len(self._waiting)} waiting, queue size {self.settings.queue_size})",
                                  retry_after=self.retry_after())
            self._waiting.extend(jobs)
            self.metrics.waiting.set(len(self._waiting))
            self._cv.notify_all()

    def cancel(self, jobs: list[Job], reason: str = "cancelled") -> None:
        """Mark jobs cancelled; the worker frees their slots at the next step."""
        with self._cv:
            for job in jobs:
                if not job.done and job.cancel_reason is None:
                    job.cancel_reason = reason
            self._cv.notify_all()

    # ------------------------------------------------------------ worker thread
    def _main(self) -> None:
        try:
            torch.set_grad_enabled(False)
            if self.settings.warmup:
                self._warmup()
        except BaseException as exc:
            log.exception("warm-up failed")
            self.fatal = exc
            return
        self._ready.set()
        log.info("engine ready on %s", self.device)
        while True:
            with self._cv:
                while not (self._waiting or self._running or self._scoring or self._stopping):
                    self._cv.wait()
                if self._stopping and not (self._waiting or self._running or self._scoring):
                    break
            try:
                self._step()
            except Exception as exc:
                log.exception("engine step failed")
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}")

    def _fail_all(self, message: str) -> None:
        for job in [*self._running, *self._scoring]:
            job.fail("internal", message)
        self._running, self._scoring, self._state = [], [], None
        self._update_gauges()

    def _warmup(self) -> None:
        """A few forwards of each kind (batch 1 and 2, prefill, decode, select, concat, infer); no metrics."""
        self._record = False
        try:
            ids = torch.tensor([[self.config.bos_token_id, 5, 6, 7], [self.config.bos_token_id, 8, 9, self.pad]], device=self.device)
            ids = ids.clamp(max=self.config.vocab_size - 1)
            mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], device=self.device)
            _, state = self.model.prefill(ids, mask)
            _, state1 = self.model.prefill(ids[:1, :2])
            state = DecodeState.concat([state.select([1]), state1])
            tokens = torch.tensor([3, 4], device=self.device).clamp(max=self.config.vocab_size - 1)
            for _ in range(3):
                self.model.decode_step(tokens, state)
            self.model.infer(ids, mask)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            self._record = True

    def _timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return result, start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0

    def _record_forward(self, phase: str, seconds: float, batch: int, out: Any, gate: torch.Tensor | None) -> None:
        if self._record:
            self.metrics.record_forward(phase, seconds, batch, out.routing.counts, gate, out.flops.executed, out.flops.dense)

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self._running) + len(self._scoring))
        self.metrics.waiting.set(len(self._waiting))

    def _step(self) -> None:
        now = time.perf_counter()
        self._reap(now)
        used = 0
        if self._running:
            used += len(self._running)
            self._decode()
        gens, scores = self._admit(now, used)
        if gens:
            used += self._prefill(gens)
        self._scoring.extend(scores)
        if self._scoring:
            self._score(self.settings.max_tokens_per_step - used)
        self._update_gauges()

    def _expired(self, job: Job, now: float) -> str | None:
        if job.cancel_reason:
            return job.cancel_reason
        return "timeout" if now > job.deadline else None

    def _reap(self, now: float) -> None:
        keep = []
        for i, job in enumerate(self._running):
            reason = self._expired(job, now)
            if reason:
                job.fail(reason, f"request {reason}")
            else:
                keep.append(i)
        if len(keep) != len(self._running):
            self._state = self._state.select(keep) if keep else None
            self._running = [self._running[i] for i in keep]
        live = []
        for job in self._scoring:
            reason = self._expired(job, now)
            if reason:
                job.fail(reason, f"request {reason}")
            else:
                live.append(job)
        self._scoring = live

    def _admit(self, now: float, used: int) -> tuple[list[GenerateJob], list[ScoreJob]]:
        budget = self.settings.max_tokens_per_step - used
        slots = self.settings.max_batch_size - len(self._running)
        score_slots = self.settings.max_batch_size - len(self._scoring)
        gens: list[GenerateJob] = []
        scores: list[ScoreJob] = []
        longest = 0
        with self._cv:
            while self._waiting:
                job = self._waiting[0]
                reason = self._expired(job, now)
                if reason:
                    self._waiting.popleft()
                    job.fail(reason, f"request {reason} while waiting")
                    continue
                if isinstance(job, GenerateJob):
                    longest_after = max(longest, len(job.prompt_ids))
                    if len(gens) >= slots or (gens and longest_after * (len(gens) + 1) > budget):
                        break
                    longest = longest_after
                    gens.append(job)
                else:
                    if len(scores) >= score_slots:
                        break
                    scores.append(job)
                self._waiting.popleft()
        for job in [*gens, *scores]:
            job.admitted = now
            if self._record:
                self.metrics.queue_wait.observe(now - job.arrival)
        return gens, scores

    # ------------------------------------------------------------ generation
    def _prefill(self, jobs: list[GenerateJob]) -> int:
        lens = [len(j.prompt_ids) for j in jobs]
        width = max(lens)
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for b, job in enumerate(jobs):
            ids[b, : lens[b]] = torch.tensor(job.prompt_ids)
            mask[b, : lens[b]] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        all_logits = any(job.params.prompt_logprobs is not None for job in jobs)
        (out, state), seconds = self._timed(lambda: self.model.prefill(ids, mask, all_logits=all_logits))
        gate = out.routing.gate[mask.bool()] if out.routing.gate is not None else None
        self._record_forward("prefill", seconds, len(jobs), out, gate)
        if self._record:
            self.metrics.prompt_tokens.inc(sum(lens))
        if all_logits:
            last = torch.stack([out.logits[b, lens[b] - 1] for b in range(len(jobs))]).float()
        else:
            last = out.logits[:, 0].float()
        for b, job in enumerate(jobs):
            job.flops[0] += out.flops.per_sequence_executed[b]
            job.flops[1] += out.flops.per_sequence_dense[b]
            job.stream = TextStream(self.tokenizer, job.params.stop)
            job.generator = make_generator(job.params.seed)
            if job.params.return_routing:
                job.routing = {"operator": out.routing.operator[b, : lens[b]].tolist(),
                               "entropy": _nan_to_none(out.routing.entropy[b, : lens[b]].tolist()),
                               "gate": _nan_to_none(out.routing.gate[b, : lens[b]].tolist())}
            if job.params.prompt_logprobs is not None:
                logp = torch.log_softmax(out.logits[b, : lens[b] - 1].float(), dim=-1)
                job.prompt_logprobs = self._logprob_entries(logp, job.prompt_ids[1:], job.params.prompt_logprobs)
                job.post({"type": "prompt", "logprobs": job.prompt_logprobs})
        next_tokens = self._sample(jobs, last)
        keep = [b for b, job in enumerate(jobs) if not self._accept(job, next_tokens[b], last[b])]
        if keep:
            state = state.select(keep) if len(keep) != len(jobs) else state
            self._state = state if self._state is None else DecodeState.concat([self._state, state])
            self._running.extend(jobs[b] for b in keep)
        return width * len(jobs)

    def _decode(self) -> None:
        jobs = self._running
        tokens = torch.tensor([job.tokens[-1] for job in jobs], dtype=torch.long, device=self.device)
        state = self._state
        out, seconds = self._timed(lambda: self.model.decode_step(tokens, state))
        gate = out.routing.gate[:, 0] if out.routing.gate is not None else None
        self._record_forward("decode", seconds, len(jobs), out, gate)
        logits = out.logits[:, 0].float()
        ops = ent = gates = None
        if any(job.params.return_routing for job in jobs):
            ops = out.routing.operator[:, 0].tolist()
            ent = _nan_to_none(out.routing.entropy[:, 0].tolist())
            gates = _nan_to_none(out.routing.gate[:, 0].tolist())
        next_tokens = self._sample(jobs, logits)
        keep = []
        for b, job in enumerate(jobs):
            job.flops[0] += out.flops.per_sequence_executed[b]
            job.flops[1] += out.flops.per_sequence_dense[b]
            if job.routing is not None and ops is not None:
                job.routing["operator"].append(ops[b])
                job.routing["entropy"].append(ent[b])
                job.routing["gate"].append(gates[b])
            if not self._accept(job, next_tokens[b], logits[b]):
                keep.append(b)
        if len(keep) != len(jobs):
            self._state = self._state.select(keep) if keep else None
            self._running = [jobs[b] for b in keep]

    def _sample(self, jobs: list[GenerateJob], logits: torch.Tensor) -> list[int]:
        tokens = sample_next(
            logits,
            [j.params.temperature for j in jobs],
            [j.params.top_k for j in jobs],
            [j.params.top_p for j in jobs],
            [j.generator for j in jobs],
        )
        return tokens.tolist()

    def _logprob_entries(self, logp: torch.Tensor, targets: list[int], top_n: int) -> list[dict[str, Any]]:
        """logp [T, V] log-probabilities; one entry per target token."""
        target = torch.tensor(targets, device=logp.device)
        chosen = logp.gather(1, target[:, None])[:, 0].tolist()
        tops = None
        if top_n > 0:
            values, indices = logp.topk(top_n, dim=-1)
            tops = list(zip(indices.tolist(), values.tolist()))
        entries = []
        for i, tok in enumerate(targets):
            entry: dict[str, Any] = {"id": tok, "logprob": chosen[i]}
            if tops is not None:
                entry["top"] = dict(zip(*tops[i]))
            entries.append(entry)
        return entries

    def _accept(self, job: GenerateJob, token: int, logits: torch.Tensor) -> bool:
        """Append a sampled token, post it, and return True when the job finished."""
        now = time.perf_counter()
        if self._record:
            if job.first_token is None:
                self.metrics.ttft.observe(now - job.arrival)
            else:
                self.metrics.inter_token.observe(now - job.last_token)
            self.metrics.generation_tokens.inc()
        if job.first_token is None:
            job.first_token = now
        job.last_token = now
        job.tokens.append(token)
        event: dict[str, Any] = {"type": "token", "token_ids": [token]}
        if job.params.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)[None]
            entry = self._logprob_entries(logp, [token], job.params.logprobs)[0]
            job.token_logprobs.append(entry)
            event["logprobs"] = [entry]
        finish = None
        if token == self.eos and not job.params.ignore_eos:
            finish = "eos"
            delta = ""
        else:
            delta = job.stream.push(token)
            if job.stream.stopped:
                finish = "stop"
        if finish is None and len(job.tokens) >= job.params.max_new_tokens:
            finish = "length"
        if finish is None and len(job.prompt_ids) + len(job.tokens) >= self.config.max_seq_len:
            finish = "length"  # context full (validation normally prevents it)
        if finish is not None:
            delta += job.stream.finish()
        event["text"] = delta
        job.post(event)
        if finish is not None:
            self._finish(job, finish, now)
            return True
        return False

    def _finish(self, job: GenerateJob, finish: str, now: float) -> None:
        job.done = True
        self._service_ema = 0.8 * self._service_ema + 0.2 * (now - (job.admitted or job.arrival))
        result = {
            "finish_reason": finish,
            "token_ids": job.tokens,
            "text": job.stream.text,
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(job.tokens),
            "queue_seconds": (job.admitted or now) - job.arrival,
            "ttft_seconds": (job.first_token - job.arrival) if job.first_token else None,
            "total_seconds": now - job.arrival,
            "flops": {"executed": job.flops[0], "dense": job.flops[1]},
            "routing": job.routing,
            "prompt_logprobs": job.prompt_logprobs,
            "token_logprobs": job.token_logprobs if job.params.logprobs is not None else None,
        }
        job.post({"type": "done", "result": result})

    # ------------------------------------------------------------ scoring
    def _score(self, budget: int) -> None:
        picked: list[tuple[ScoreJob, Window]] = []
        longest = 0
        for job in self._scoring:
            while job.pending and len(picked) < self.settings.max_batch_size:
                win = job.pending[0]
                longest_after = max(longest, win.end - win.begin)
                if picked and longest_after * (len(picked) + 1) > budget:
                    break
                picked.append((job, job.pending.popleft()))
                longest = longest_after
            else:
                continue
            break
        if not picked:
            return
        ids = torch.full((len(picked), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(picked), longest), dtype=torch.long)
        for r, (job, win) in enumerate(picked):
            ids[r, : win.end - win.begin] = torch.tensor(job.seqs[win.seq][win.begin:win.end])
            mask[r, : win.end - win.begin] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        out, seconds = self._timed(lambda: self.model.infer(ids, mask))
        gate = out.routing.gate[mask.bool()] if out.routing.gate is not None else None
        self._record_forward("prefill", seconds, len(picked), out, gate)
        if self._record:
            self.metrics.prompt_tokens.inc(int(mask.sum()))
        n_ops = 4
        for r, (job, win) in enumerate(picked):
            seq = job.seqs[win.seq]
            lo = win.score_from - 1 - win.begin  # input position predicting the first scored target
            hi = win.end - win.begin
            logp = torch.log_softmax(out.logits[r, lo:hi].float(), dim=-1)
            targets = torch.tensor(seq[win.score_from: win.end + 1], device=logp.device)
            chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
            job.logprobs[win.seq][win.score_from - 1: win.end] = chosen
            if job.top is not None:
                values, indices = logp.topk(job.top_n, dim=-1)
                for i, (ix, vs) in enumerate(zip(indices.tolist(), values.tolist())):
                    job.top[win.seq][win.score_from - 1 + i] = dict(zip(ix, vs))
            ops = out.routing.operator[r, lo:hi].long()  # [n, L]
            onehot = torch.zeros(ops.shape[1], n_ops, dtype=torch.long, device=ops.device)
            valid = ops >= 0
            layer_idx = torch.arange(ops.shape[1], device=ops.device).expand_as(ops)
            onehot.index_put_((layer_idx[valid], ops[valid]), torch.ones_like(ops[valid]), accumulate=True)
            onehot = onehot.cpu()
            job.counts[win.seq] = onehot if job.counts[win.seq] is None else job.counts[win.seq] + onehot
            job.remaining -= 1
        now = time.perf_counter()
        finished = [job for job in self._scoring if job.remaining == 0]
        for job in finished:
            job.done = True
            self._service_ema = 0.8 * self._service_ema + 0.2 * (now - (job.admitted or job.arrival))
            job.post({"type": "done", "result": {
                "logprobs": job.logprobs,
                "top": job.top,
                "counts": [c.tolist() for c in job.counts],
                "windows": job.n_windows,
                "queue_seconds": (job.admitted or now) - job.arrival,
                "total_seconds": now - job.arrival,
            }})
        if finished:
            self._scoring = [job for job in self._scoring if job.remaining]


def _nan_to_none(values: list) -> list:
    if values and isinstance(values[0], list):
        return [_nan_to_none(v) for v in values]
    return [None if (v is None or v != v) else v for v in values]
