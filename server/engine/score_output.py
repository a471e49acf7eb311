"""Scoring requests' outputs: log-likelihoods, alternatives, routing counts and traces, booked from the
computed chunks or from a cached prefix, and the result once every window is in."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from model import Operator
from server.engine.outputs import Part, ScoreChunk
from server.engine.prefix_cache import TOP, CachedPrefix
from server.engine.requests import DoneEvent, Job, RequestCost, ScoreJob, ScoreResult, Window
from server.metrics import ModelMetrics

N_OPERATORS = len(Operator)


def nan_to_none(values: list) -> list:
    if values and isinstance(values[0], list):
        return [nan_to_none(v) for v in values]
    return [None if (v is None or v != v) else v for v in values]


def cached_top(prefix: CachedPrefix, position: int, top_n: int) -> dict[int, float] | None:
    """The top `top_n` alternatives a cached prefix kept at `position` (it keeps TOP, the API's most)."""
    if top_n <= 0:
        return None
    assert prefix.top_ids is not None and prefix.top_logprobs is not None
    return dict(zip(prefix.top_ids[position, :top_n].tolist(), prefix.top_logprobs[position, :top_n].tolist()))


def chosen_and_top(logp: Tensor, targets: list[int], top_n: int) -> tuple[list[float], list[dict[int, float]] | None]:
    """logp [T, V]: each target's log-probability, and per position its top_n alternatives (None for top_n 0),
    the first top_n of the TOP best: as a cached prefix keeps them, so cached and computed ones agree."""
    chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
    if top_n <= 0:
        return chosen, None
    values, indices = logp.topk(max(TOP, top_n), dim=-1)
    return chosen, [dict(zip(ix[:top_n], vs[:top_n])) for ix, vs in zip(indices.tolist(), values.tolist())]


def book_scored(job: ScoreJob, win: Window, lo: int, hi: int, chosen: list[float], tops: list[dict] | None, ops: Tensor, entropy: Any,
                gate: Any) -> None:
    """Scored input positions [lo, hi) of a window: log-likelihoods, alternatives, routing counts and trace."""
    job.logprobs[win.seq][lo: hi] = chosen
    if tops is not None and job.top is not None:
        job.top[win.seq][lo: hi] = tops
    counts = torch.zeros(ops.shape[1], N_OPERATORS, dtype=torch.long)
    layer_idx = torch.arange(ops.shape[1]).expand_as(ops)
    counts.index_put_((layer_idx.reshape(-1), ops.reshape(-1)), torch.ones(ops.numel(), dtype=torch.long), accumulate=True)
    job.counts[win.seq] = counts if job.counts[win.seq] is None else job.counts[win.seq] + counts
    if job.routing is not None:
        trace = job.routing[win.seq]
        trace.operator[lo:hi] = ops.tolist()
        trace.entropy[lo:hi] = nan_to_none(entropy.tolist())
        trace.gate[lo:hi] = [None] * (hi - lo) if gate is None else nan_to_none(gate.tolist())


class ScoreOutput:
    """Books scored chunks into their ScoreJob; a failure fails that request alone (through `fail`)."""

    def __init__(self, metrics: ModelMetrics, price: Callable[[RequestCost], tuple[float, float]],
                 fail: Callable[[Job, str], None]) -> None:
        self.metrics = metrics
        self.price = price
        self.fail = fail

    def score(self, parts: list[Part]) -> list[Job]:
        """Book log-likelihoods of scored chunks; returns the scoring requests now complete."""
        ended: list[Job] = []
        for part in parts:
            job = part.job
            assert isinstance(job, ScoreJob) and isinstance(part.chunk, ScoreChunk)
            if job.done:
                continue
            try:
                self.book_chunk(job, part)
                if job.windows_left == 0:
                    self.finish(job)
                    ended.append(job)
            except Exception as exc:
                self.fail(job, f"scoring failed: {type(exc).__name__}")
                ended.append(job)
        return ended

    def score_nothing(self, jobs: list[ScoreJob]) -> list[Job]:
        """Admitted scoring requests with no target at all (each sequence is BOS alone): done at once."""
        ended: list[Job] = [j for j in jobs if not j.done and j.windows_left == 0]
        for job in ended:
            self.finish(job)  # type: ignore[arg-type]
        return ended

    def book_chunk(self, job: ScoreJob, part: Part) -> None:
        chunk = part.chunk
        assert isinstance(chunk, ScoreChunk) and part.logits is not None
        win = chunk.window
        first = win.begin + chunk.start  # input position of the chunk's first row
        computed = first + part.logits_from  # first input position whose logits the runner computed
        lo, hi = max(computed, win.begin + win.booked), win.begin + chunk.end  # a recompute books nothing twice
        if self.metrics.recording:
            self.metrics.prompt_tokens.inc(max(0, chunk.end - max(chunk.start, win.booked)))
        if hi > lo:
            logp = part.log_probs()[lo - computed: hi - computed]
            targets = job.seqs[win.seq][lo + 1: hi + 1]
            chosen, tops = chosen_and_top(logp, targets, job.top_n if job.top is not None else 0)
            operator, entropy, gate = part.routing()
            rows = slice(lo - first, hi - first)
            book_scored(job, win, lo, hi, chosen, tops, operator[rows].long().cpu(), entropy[rows],
                        None if gate is None else gate[rows])
        win.booked = max(win.booked, chunk.end)
        if chunk.last:
            job.windows_left -= 1

    def book_cached_window(self, job: ScoreJob, win: Window, prefix: CachedPrefix) -> None:
        """A window started from a cached prefix: its scored positions among the cached ones."""
        if self.metrics.recording:
            self.metrics.prompt_tokens.inc(max(0, prefix.tokens - win.booked))
        lo, hi = max(win.score_from - 1, win.begin + win.booked), win.begin + prefix.tokens
        if hi > lo:
            assert prefix.logprob is not None
            rows = slice(lo - win.begin, hi - win.begin)
            tops = [cached_top(prefix, p, job.top_n) or {} for p in range(rows.start, rows.stop)] \
                if job.top is not None and job.top_n else None
            book_scored(job, win, lo, hi, prefix.logprob[rows].tolist(), tops, torch.from_numpy(prefix.operator[rows]).long(),
                        prefix.entropy[rows], None if prefix.gate is None else prefix.gate[rows])
        win.booked = max(win.booked, prefix.tokens)

    def finish(self, job: ScoreJob) -> None:
        now = time.perf_counter()
        job.done = True
        job.post(DoneEvent(job.index, ScoreResult(
            logprobs=job.logprobs, top=job.top, counts=[c.tolist() if c is not None else [] for c in job.counts], windows=job.n_windows,
            queue_seconds=(job.admitted or now) - job.arrival, total_seconds=now - job.arrival, routing=job.routing,
            flops=[list(self.price(cost)) for cost in job.costs], cached_tokens=job.cached_tokens)))
