"""Output processing: sampling, stopping, detokenisation, logprobs, events and results.

Everything here is per request and guarded: an exception while handling one request fails that
request alone (a JSON error or an SSE error event); the others carry on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from tokenizers import Tokenizer
from torch import Tensor

from model import FinishReason, Operator, StoppingCriteria, make_generator, sample_tokens
from server.engine.outputs import Part, PrefillChunk, RunnerOutput, ScoreChunk
from server.engine.requests import (
    DoneEvent,
    GenerateJob,
    GenerationResult,
    Job,
    LogprobEntry,
    PromptEvent,
    RequestCost,
    ScoreJob,
    ScoreResult,
    TokenEvent,
)
from server.engine.runner import FaultInjector
from server.metrics import ModelMetrics
from server.textstream import TextStream

log = logging.getLogger("server.engine")
N_OPERATORS = len(Operator)


def nan_to_none(values: list) -> list:
    if values and isinstance(values[0], list):
        return [nan_to_none(v) for v in values]
    return [None if (v is None or v != v) else v for v in values]


def logprob_entries(logp: Tensor, targets: list[int], top_n: int) -> list[LogprobEntry]:
    """logp [T, V] log-probabilities; one entry per target token."""
    chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
    if top_n > 0:
        values, indices = logp.topk(top_n, dim=-1)
        tops = [dict(zip(ix, vs)) for ix, vs in zip(indices.tolist(), values.tolist())]
        return [LogprobEntry(t, lp, top) for t, lp, top in zip(targets, chosen, tops)]
    return [LogprobEntry(t, lp) for t, lp in zip(targets, chosen)]


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_seq_len: int, eos: int, metrics: ModelMetrics, faults: FaultInjector,
                 price: Callable[[RequestCost], tuple[float, float]]) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.eos = eos
        self.metrics = metrics
        self.faults = faults
        self.price = price  # (executed, dense) FLOPs of a request's routing totals
        self.record = True
        self.completed_seconds: list[float] = []  # arrival -> done of finished requests (retry estimates)

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
                if part.chunk.last:
                    self._start(job)
                    sample.append(part)
                    started.append(job)
            except Exception as exc:
                self._fail(job, f"prompt processing failed: {type(exc).__name__}")
                ended.append(job)
        if sample:
            ended += self._sample_and_accept(sample)
        ended += self.score(ro.score)
        return ended, [j for j in started if not j.done]

    def _start(self, job: GenerateJob) -> None:
        """The prompt is in the cache: the request's stream, generator and stopping rules, once."""
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
        chunk = part.chunk
        assert isinstance(chunk, PrefillChunk)
        if self.record:
            self.metrics.prompt_tokens.inc(chunk.end - chunk.start)
        if job.routing is not None:
            operator, entropy, gate = part.routing()
            job.routing.operator += operator.tolist()
            job.routing.entropy += nan_to_none(entropy.tolist())
            job.routing.gate += [None] * operator.shape[0] if gate is None else nan_to_none(gate.tolist())
        if job.prompt_logprobs is not None:
            targets = job.prompt_ids[chunk.start + 1: chunk.end + 1]  # the last position predicts a new token
            if targets:
                assert part.logits is not None
                logp = torch.log_softmax(part.logits[: len(targets)].float(), dim=-1)
                job.prompt_logprobs += logprob_entries(logp, targets, job.params.prompt_logprobs or 0)

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
        if self.record:
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
        self.completed_seconds.append(now - job.arrival)
        executed, dense = self.price(job.cost)
        assert job.stream is not None
        result = GenerationResult(
            finish_reason=finish, token_ids=job.tokens, text=job.stream.text, prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(job.tokens), queue_seconds=(job.admitted or now) - job.arrival,
            ttft_seconds=(job.first_token - job.arrival) if job.first_token else None, total_seconds=now - job.arrival,
            flops_executed=executed, flops_dense=dense, routing=job.routing, prompt_logprobs=job.prompt_logprobs,
            token_logprobs=job.token_logprobs if job.params.logprobs is not None else None)
        job.post(DoneEvent(job.index, result))

    # ------------------------------------------------------------------ scoring
    def score(self, parts: list[Part]) -> list[Job]:
        """Book log-likelihoods of scored chunks; returns the scoring requests now complete."""
        ended: list[Job] = []
        for part in parts:
            job = part.job
            assert isinstance(job, ScoreJob) and isinstance(part.chunk, ScoreChunk)
            if job.done:
                continue
            try:
                self._book_score_chunk(job, part)
                if job.windows_left == 0:
                    self._finish_score(job)
                    ended.append(job)
            except Exception as exc:
                self._fail(job, f"scoring failed: {type(exc).__name__}")
                ended.append(job)
        return ended

    def score_nothing(self, jobs: list[ScoreJob]) -> list[Job]:
        """Admitted scoring requests with no target at all (each sequence is BOS alone): done at once."""
        ended: list[Job] = [j for j in jobs if not j.done and j.windows_left == 0]
        for job in ended:
            self._finish_score(job)  # type: ignore[arg-type]
        return ended

    def _book_score_chunk(self, job: ScoreJob, part: Part) -> None:
        chunk = part.chunk
        assert isinstance(chunk, ScoreChunk) and part.logits is not None
        win = chunk.window
        seq = job.seqs[win.seq]
        first = win.begin + chunk.start  # input position of the chunk's first row
        lo = first + part.logits_from  # first input position whose target is scored (the runner computed logits from it)
        hi = win.begin + chunk.end
        if self.record:
            self.metrics.prompt_tokens.inc(chunk.end - chunk.start)
        if hi > lo:
            logp = torch.log_softmax(part.logits.float(), dim=-1)
            targets = seq[lo + 1: hi + 1]
            chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
            job.logprobs[win.seq][lo: hi] = chosen
            if job.top is not None and job.top_n:
                values, indices = logp.topk(job.top_n, dim=-1)
                for i, (ix, vs) in enumerate(zip(indices.tolist(), values.tolist())):
                    job.top[win.seq][lo + i] = dict(zip(ix, vs))
            operator, entropy, gate = part.routing()
            rows = slice(lo - first, hi - first)
            ops = operator[rows].long().cpu()  # [n, L]
            counts = torch.zeros(ops.shape[1], N_OPERATORS, dtype=torch.long)
            layer_idx = torch.arange(ops.shape[1]).expand_as(ops)
            counts.index_put_((layer_idx.reshape(-1), ops.reshape(-1)), torch.ones(ops.numel(), dtype=torch.long), accumulate=True)
            job.counts[win.seq] = counts if job.counts[win.seq] is None else job.counts[win.seq] + counts
            if job.routing is not None:
                trace = job.routing[win.seq]
                trace.operator[lo:hi] = operator[rows].tolist()
                trace.entropy[lo:hi] = nan_to_none(entropy[rows].tolist())
                trace.gate[lo:hi] = [None] * (hi - lo) if gate is None else nan_to_none(gate[rows].tolist())
        if chunk.last:
            job.windows_left -= 1

    def _finish_score(self, job: ScoreJob) -> None:
        now = time.perf_counter()
        job.done = True
        self.completed_seconds.append(now - job.arrival)
        job.post(DoneEvent(job.index, ScoreResult(
            logprobs=job.logprobs, top=job.top, counts=[c.tolist() if c is not None else [] for c in job.counts], windows=job.n_windows,
            queue_seconds=(job.admitted or now) - job.arrival, total_seconds=now - job.arrival, routing=job.routing,
            flops=[list(self.price(cost)) for cost in job.costs])))
