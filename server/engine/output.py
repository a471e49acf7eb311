"""Output processing: sampling, stopping, detokenisation, logprobs, events and results.

Everything here is per request and guarded: an exception while handling one request fails that
request alone (a JSON error or an SSE error event); the others carry on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from model import FinishReason, StoppingCriteria, make_generator, sample_tokens
from server.engine.outputs import Part, PrefillChunk, Reuse, RunnerOutput
from server.engine.requests import (
    DoneEvent,
    GenerateJob,
    GenerationResult,
    Job,
    LogprobEntry,
    PromptEvent,
    RequestCost,
    ScoreJob,
    TokenEvent,
)
from server.engine.runner import FaultInjector
from server.engine.score_output import ScoreOutput, cached_top, chosen_and_top, nan_to_none
from server.metrics import ModelMetrics
from server.textstream import TextStream

log = logging.getLogger("server.engine")
def logprob_entries(logp: Tensor, targets: list[int], top_n: int) -> list[LogprobEntry]:
    """logp [T, V] log-probabilities; one entry per target token."""
    chosen, tops = chosen_and_top(logp, targets, top_n)
    return [LogprobEntry(t, lp, None if tops is None else tops[i]) for i, (t, lp) in enumerate(zip(targets, chosen))]


def book_prompt(job: GenerateJob, lo: int, hi: int, operator: Any, entropy: Any, gate: Any, entries: list[LogprobEntry] | None) -> None:
    """Prompt positions [lo, hi), the next ones not booked: their routing (tensors or arrays) and logprob entries."""
    assert lo == job.booked, (lo, job.booked)
    if job.routing is not None:
        job.routing.operator += operator.tolist()
        job.routing.entropy += nan_to_none(entropy.tolist())
        job.routing.gate += [None] * (hi - lo) if gate is None else nan_to_none(gate.tolist())
    if job.prompt_logprobs is not None and entries is not None:
        job.prompt_logprobs += entries
    job.booked = hi


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_seq_len: int, eos: int, metrics: ModelMetrics, faults: FaultInjector,
                 price: Callable[[RequestCost], tuple[float, float]]) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.eos = eos
        self.metrics = metrics
        self.faults = faults
        self.price = price  # (executed, dense) FLOPs of a request's routing totals
        self.scoring = ScoreOutput(metrics, price, self._fail)

    # ------------------------------------------------------------------ guards
    def _fail(self, job: Job, message: str) -> None:
        log.warning("request %s failed: %s", job.id, message)
        job.fail("internal", message)

    # ------------------------------------------------------------------ one step
    def process(self, ro: RunnerOutput) -> tuple[list[Job], list[GenerateJob]]:
        """Book what the step computed; sample every decode and every completed prompt in one call.
        Returns (requests that ended, requests whose prompt completed and that go on decoding)."""
        ended: list[Job] = []
        for job, message in ro.failed:
            job.fail("internal", message)
            ended.append(job)
        sample = [p for p in ro.decode if not p.job.done]
        started = []
        for part in ro.prefill:
            job = part.job
            assert isinstance(job, GenerateJob) and isinstance(part.chunk, PrefillChunk)
            try:
                self._book_prompt_chunk(job, part)
                if part.chunk.last and job.resumed:  # recomputed after a preemption: its next token is known
                    started.append(job)
                elif part.chunk.last:
                    self._start(job)
                    sample.append(part)
                    started.append(job)
            except Exception as exc:
                self._fail(job, f"prompt processing failed: {type(exc).__name__}")
                ended.append(job)
        if sample:
            ended += self._sample_and_accept(sample)
        ended += self.scoring.score(ro.score)
        return ended, [j for j in started if not j.done]

    def _start(self, job: GenerateJob) -> None:
        """The prompt is in the cache: the request's stream, generator and stopping rules, once."""
        if job.stream is not None:  # preempted before its first token: it started once already
            return
        job.stream = TextStream(self.tokenizer, job.params.stop)
        job.generator = make_generator(job.params.seed)
        job.criteria = StoppingCriteria(job.params.max_new_tokens, self.max_seq_len, None if job.params.ignore_eos else self.eos)
        if job.prompt_logprobs is not None:
            job.post(PromptEvent(job.index, job.prompt_logprobs))

    def _sample_and_accept(self, parts: list[Part]) -> list[Job]:
        ended: list[Job] = []
        jobs: list[GenerateJob] = [p.job for p in parts]  # type: ignore[misc]
        logits = torch.cat([p.logits[-1:] for p in parts])  # type: ignore[index]
        for r, job, token, row in self._sample(jobs, logits, ended):
            part = parts[r]
            try:
                if job.routing is not None and part.chunk is None:
                    operator, entropy, gate = part.routing()
                    job.routing.operator.append(operator[0].tolist())
                    job.routing.entropy.append(nan_to_none(entropy[0].tolist()))
                    job.routing.gate.append(None if gate is None else nan_to_none([float(gate[0])])[0])
                if self._accept(job, token, row):
                    ended.append(job)
            except Exception as exc:
                self._fail(job, f"output processing failed: {type(exc).__name__}")
                ended.append(job)
        return ended

    def _book_prompt_chunk(self, job: GenerateJob, part: Part) -> None:
        """Routing and prompt logprobs of the chunk's prompt positions not booked yet (a recompute adds none)."""
        chunk = part.chunk
        assert isinstance(chunk, PrefillChunk)
        lo, hi = max(chunk.start, job.booked), min(chunk.end, len(job.prompt_ids))
        if hi <= lo:
            return
        rows = slice(lo - chunk.start, hi - chunk.start)
        operator, entropy, gate = part.routing()
        entries = None
        if job.prompt_logprobs is not None:
            targets = job.prompt_ids[lo + 1: hi + 1]  # the last position predicts a new token
            entries = logprob_entries(part.log_probs()[rows][: len(targets)], targets, job.params.prompt_logprobs or 0) if targets else []
        self._book_prompt(job, lo, hi, operator[rows], entropy[rows], None if gate is None else gate[rows], entries)

    def _book_prompt(self, job: GenerateJob, lo: int, hi: int, operator: Any, entropy: Any, gate: Any,
                     entries: list[LogprobEntry] | None) -> None:
        if self.metrics.recording:
            self.metrics.prompt_tokens.inc(hi - lo)
        book_prompt(job, lo, hi, operator, entropy, gate, entries)

    def book_reuse(self, reuse: Reuse) -> None:
        """A sequence started from a cached prefix: book the prefix's outputs as if its forwards had run."""
        job, window, prefix = reuse.job, reuse.window, reuse.prefix
        try:
            if window is not None:
                assert isinstance(job, ScoreJob)
                self.scoring.book_cached_window(job, window, prefix)
                return
            assert isinstance(job, GenerateJob)
            lo, hi = job.booked, min(prefix.tokens, len(job.prompt_ids))
            if hi <= lo:
                return
            entries = None
            if job.prompt_logprobs is not None:
                assert prefix.logprob is not None and prefix.top_ids is not None and prefix.top_logprobs is not None
                n = job.params.prompt_logprobs or 0
                entries = [LogprobEntry(job.prompt_ids[p + 1], float(prefix.logprob[p]), cached_top(prefix, p, n))
                           for p in range(lo, min(hi, len(job.prompt_ids) - 1))]
            self._book_prompt(job, lo, hi, prefix.operator[lo:hi], prefix.entropy[lo:hi],
                              None if prefix.gate is None else prefix.gate[lo:hi], entries)
        except Exception as exc:
            self._fail(job, f"prompt processing failed: {type(exc).__name__}")

    def _sample(self, jobs: list[GenerateJob], logits: Tensor, ended: list[Job]) -> list[tuple[int, GenerateJob, int, Tensor]]:
        """Batched sampling; rows that cannot be sampled fail alone (and are added to `ended`)."""
        tokens, bad = sample_tokens(logits, [j.params.temperature for j in jobs], [j.params.top_k for j in jobs],
                                    [j.params.top_p for j in jobs], [j.generator for j in jobs])
        bad_rows = set(bad)
        for row, job in enumerate(jobs):
            try:
                self.faults.check("sample", job.prompt_ids)
            except Exception as exc:
                self._fail(job, f"sampling failed: {exc}")
                bad_rows.add(row)
                ended.append(job)
                continue
            if row in bad:
                self._fail(job, "sampling failed: the logits give no distribution (non-finite values)")
                ended.append(job)
        return [(r, job, tokens[r], logits[r]) for r, job in enumerate(jobs) if r not in bad_rows]

    def _accept(self, job: GenerateJob, token: int, logits: Tensor) -> bool:
        """Append a sampled token, post it, and return True when the request finished."""
        now = time.perf_counter()
        if self.metrics.recording:
            if job.first_token is None:
                self.metrics.ttft.observe(now - job.arrival)
            else:
                self.metrics.inter_token.observe(now - job.last_token)
            self.metrics.generation_tokens.inc()
        if job.first_token is None:
            job.first_token = now
        job.last_token = now
        job.tokens.append(token)
        entries = None
        if job.params.logprobs is not None:
            logp = torch.log_softmax(logits.float(), dim=-1)[None]
            entries = logprob_entries(logp, [token], job.params.logprobs)
            job.token_logprobs += entries
        criteria, stream = job.criteria, job.stream
        assert criteria is not None and stream is not None
        delta = "" if token == criteria.eos_token_id else stream.push(token)
        finish = criteria.check(token, len(job.tokens), len(job.prompt_ids) + len(job.tokens), stream.stopped)
        if finish is not None:
            delta += stream.finish()
        job.post(TokenEvent(job.index, [token], delta, entries))
        if finish is None:
            return False
        self._finish(job, finish, now)
        return True

    def _finish(self, job: GenerateJob, finish: FinishReason, now: float) -> None:
        job.done = True
        executed, dense = self.price(job.cost)
        assert job.stream is not None
        result = GenerationResult(
            finish_reason=finish, token_ids=job.tokens, text=job.stream.text, prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(job.tokens), queue_seconds=(job.admitted or now) - job.arrival,
            ttft_seconds=(job.first_token - job.arrival) if job.first_token else None, total_seconds=now - job.arrival,
            flops_executed=executed, flops_dense=dense, routing=job.routing, prompt_logprobs=job.prompt_logprobs,
            token_logprobs=job.token_logprobs if job.params.logprobs is not None else None, cached_tokens=job.cached_tokens)
        job.post(DoneEvent(job.index, result))
