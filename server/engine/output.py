"""Output processing: sampling, stopping, detokenisation, logprobs, events and results.

Everything here is per request and guarded: an exception while handling one request fails that
request alone (a JSON error or an SSE error event); the others carry on.
"""

from __future__ import annotations

import logging
import time

import torch
from tokenizers import Tokenizer
from torch import Tensor

from model import FinishReason, Operator, StoppingCriteria, make_generator, sample_tokens
from server.engine.requests import (
    DoneEvent,
    GenerateJob,
    GenerationResult,
    Job,
    LogprobEntry,
    PromptEvent,
    ScoreJob,
    ScoreResult,
    TokenEvent,
)
from server.engine.runner import ChunkOutput, DecodeOutput, FaultInjector
from server.engine.scheduler import PrefillChunk, ScoreChunk
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
    def __init__(self, tokenizer: Tokenizer, max_seq_len: int, eos: int, metrics: ModelMetrics, faults: FaultInjector) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.eos = eos
        self.metrics = metrics
        self.faults = faults
        self.record = True
        self.completed_seconds: list[float] = []  # arrival -> done of finished requests (retry estimates)

    # ------------------------------------------------------------------ guards
    def _fail(self, job: Job, message: str) -> None:
        log.warning("request %s failed: %s", job.id, message)
        job.fail("internal", message)

    # ------------------------------------------------------------------ generation
    def decode(self, d: DecodeOutput) -> list[Job]:
        """Sample the next token of every running sequence; returns the requests that ended."""
        ended: list[Job] = []
        flops_e, flops_d = d.out.flops.per_sequence_executed, d.out.flops.per_sequence_dense
        for b, job in enumerate(d.jobs):  # before the result is assembled
            job.flops[0] += flops_e[b]
            job.flops[1] += flops_d[b]
        for r, job, token, logits in self._sample(d.jobs, d.logits, ended):
            try:
                if job.routing is not None:
                    job.routing.operator.append(d.out.routing.operator[r, 0].tolist())
                    job.routing.entropy.append(nan_to_none(d.out.routing.entropy[r, 0].tolist()))
                    job.routing.gate.append(nan_to_none([float(d.out.routing.gate[r, 0])])[0])
                if self._accept(job, token, logits):
                    ended.append(job)
            except Exception as exc:
                self._fail(job, f"output processing failed: {type(exc).__name__}")
                ended.append(job)
        return ended

    def prefill(self, outputs: list[ChunkOutput]) -> tuple[list[Job], list[ChunkOutput]]:
        """Book prompt chunks; sample the first token of prompts now complete.
        Returns (requests that ended, last chunks whose request goes on decoding)."""
        ended: list[Job] = []
        last: list[ChunkOutput] = []
        for o in outputs:
            chunk = o.chunk
            assert isinstance(chunk, PrefillChunk)
            job = chunk.job
            try:
                self._book_prompt_chunk(job, chunk, o)
                if chunk.last:
                    job.stream = TextStream(self.tokenizer, job.params.stop)
                    job.generator = make_generator(job.params.seed)
                    if job.prompt_logprobs is not None:
                        job.post(PromptEvent(job.index, job.prompt_logprobs))
                    last.append(o)
            except Exception as exc:
                self._fail(job, f"prompt processing failed: {type(exc).__name__}")
                ended.append(job)
        if not last:
            return ended, []
        going_on = []
        logits = torch.stack([o.logits[-1] for o in last])
        by_job = {id(o.chunk.job): o for o in last}
        for _, job, token, row in self._sample([o.chunk.job for o in last], logits, ended):  # type: ignore[misc]
            try:
                if self._accept(job, token, row):
                    ended.append(job)
                else:
                    going_on.append(by_job[id(job)])
            except Exception as exc:
                self._fail(job, f"output processing failed: {type(exc).__name__}")
                ended.append(job)
        return ended, going_on

    def _book_prompt_chunk(self, job: GenerateJob, chunk: PrefillChunk, o: ChunkOutput) -> None:
        job.flops[0] += o.flops_executed
        job.flops[1] += o.flops_dense
        if self.record:
            self.metrics.prompt_tokens.inc(chunk.end - chunk.start)
        if job.routing is not None:
            job.routing.operator += o.operator.tolist()
            job.routing.entropy += nan_to_none(o.entropy.tolist())
            job.routing.gate += nan_to_none(o.gate.tolist())
        if job.prompt_logprobs is not None:
            targets = job.prompt_ids[chunk.start + 1: chunk.end + 1]  # the last position predicts a new token
            if targets:
                logp = torch.log_softmax(o.logits[: len(targets)].float(), dim=-1)
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
        criteria = StoppingCriteria(job.params.max_new_tokens, self.max_seq_len, None if job.params.ignore_eos else self.eos)
        delta = "" if token == criteria.eos_token_id else job.stream.push(token)
        finish = criteria.check(token, len(job.tokens), len(job.prompt_ids) + len(job.tokens), job.stream.stopped)
        if finish is not None:
            delta += job.stream.finish()
        job.post(TokenEvent(job.index, [token], delta, entries))
        if finish is None:
            return False
        self._finish(job, finish, now)
        return True

    def _finish(self, job: GenerateJob, finish: FinishReason, now: float) -> None:
        job.done = True
        self.completed_seconds.append(now - job.arrival)
        result = GenerationResult(
            finish_reason=finish, token_ids=job.tokens, text=job.stream.text, prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(job.tokens), queue_seconds=(job.admitted or now) - job.arrival,
            ttft_seconds=(job.first_token - job.arrival) if job.first_token else None, total_seconds=now - job.arrival,
            flops_executed=job.flops[0], flops_dense=job.flops[1], routing=job.routing, prompt_logprobs=job.prompt_logprobs,
            token_logprobs=job.token_logprobs if job.params.logprobs is not None else None)
        job.post(DoneEvent(job.index, result))

    # ------------------------------------------------------------------ scoring
    def score(self, outputs: list[ChunkOutput]) -> list[Job]:
        """Book log-likelihoods of scored chunks; returns the scoring requests now complete."""
        ended: list[Job] = []
        for o in outputs:
            chunk = o.chunk
            assert isinstance(chunk, ScoreChunk)
            job = chunk.job
            if job.done:
                continue
            try:
                self._book_score_chunk(job, chunk, o)
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

    def _book_score_chunk(self, job: ScoreJob, chunk: ScoreChunk, o: ChunkOutput) -> None:
        win = chunk.window
        seq = job.seqs[win.seq]
        first = win.begin + chunk.start  # input position of the chunk's first row
        lo = max(win.score_from - 1, first)  # first input position whose target is scored
        hi = win.begin + chunk.end
        if self.record:
            self.metrics.prompt_tokens.inc(chunk.end - chunk.start)
        if hi > lo:
            logp = torch.log_softmax(o.logits[lo - first: hi - first].float(), dim=-1)
            targets = seq[lo + 1: hi + 1]
            chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
            job.logprobs[win.seq][lo: hi] = chosen
            if job.top is not None and job.top_n:
                values, indices = logp.topk(job.top_n, dim=-1)
                for i, (ix, vs) in enumerate(zip(indices.tolist(), values.tolist())):
                    job.top[win.seq][lo + i] = dict(zip(ix, vs))
            ops = o.operator[lo - first: hi - first].long().cpu()  # [n, L]
            counts = torch.zeros(ops.shape[1], N_OPERATORS, dtype=torch.long)
            valid = ops >= 0
            layer_idx = torch.arange(ops.shape[1]).expand_as(ops)
            counts.index_put_((layer_idx[valid], ops[valid]), torch.ones_like(ops[valid]), accumulate=True)
            job.counts[win.seq] = counts if job.counts[win.seq] is None else job.counts[win.seq] + counts
            if job.routing is not None:
                trace, rows = job.routing[win.seq], slice(lo - first, hi - first)
                trace.operator[lo:hi] = o.operator[rows].tolist()
                trace.entropy[lo:hi] = nan_to_none(o.entropy[rows].tolist())
                trace.gate[lo:hi] = nan_to_none(o.gate[rows].tolist())
        job.flops[win.seq][0] += o.flops_executed
        job.flops[win.seq][1] += o.flops_dense
        if chunk.last:
            job.windows_left -= 1

    def _finish_score(self, job: ScoreJob) -> None:
        now = time.perf_counter()
        job.done = True
        self.completed_seconds.append(now - job.arrival)
        job.post(DoneEvent(job.index, ScoreResult(
            logprobs=job.logprobs, top=job.top, counts=[c.tolist() if c is not None else [] for c in job.counts], windows=job.n_windows,
            queue_seconds=(job.admitted or now) - job.arrival, total_seconds=now - job.arrival, routing=job.routing,
            flops=job.flops)))
