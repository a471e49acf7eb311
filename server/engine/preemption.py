"""Preemption: before each step's forward, make room in the KV pool for the step's decode tokens.

Each decode token may open a new block in every attention layer (at a block boundary), so that worst case
must be free before the forward. Cached prefixes no sequence uses go first (least recently used); then the
most recently admitted sequence (a generation or a scoring window) is preempted: it gives its blocks back
and returns to the queue, to be recomputed from its tokens (vLLM's last-in-first-out policy). With nothing
decoding, one token of the step's first chunk must fit, so sequences that filled the pool while
prefilling cannot stall each other. A sequence that cannot fit even with the pool to itself fails.
"""

from __future__ import annotations

import logging

from server.engine.outputs import SchedulerOutput, ScoreChunk
from server.engine.requests import GenerateJob, Job, Window
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler

log = logging.getLogger("server.engine")


def step_need(runner: ModelRunner, out: SchedulerOutput) -> tuple[int, tuple[Job, Window | None] | None]:
    """Blocks this step needs at worst to make progress: every decode token, or with none one token of the
    first chunk (whose owner is returned: preempting it would not help)."""
    rows, cache = runner.rows, runner.cache
    if out.decode:
        return sum(cache.blocks_needed([(rows.get((j.id, -1)), 1) for j in out.decode])), None
    chunk = out.prefill[0] if out.prefill else out.score[0] if out.score else None
    if chunk is None:
        return 0, None
    window = chunk.window if isinstance(chunk, ScoreChunk) else None
    key = (chunk.job.id, -1 if window is None else window.index)
    return cache.blocks_needed([(rows.get(key), 1)])[0], (chunk.job, window)


def make_room(scheduler: Scheduler, runner: ModelRunner, out: SchedulerOutput) -> int:
    """Evict, then preempt until the step fits (its preempted and failed sequences leave `out`); returns the
    number of preemptions."""
    preempted = 0
    while True:
        need, owner = step_need(runner, out)
        if runner.make_room(need):
            return preempted
        candidates = [(job, window) for job, window in victims(scheduler)
                   if runner.holds(job, window) and not (owner and job is owner[0] and window is owner[1])]
        if not candidates:
            assert owner is not None  # decoding sequences hold rows, so they would be victims
            job = owner[0]
            job.fail("kv_cache_exceeded", "the sequence needs more KV cache than the server's budget holds "
                     f"({scheduler.limits.kv_budget_bytes / 2**20:.2f} MiB, --kv-cache-mb)")
            scheduler.drop([job])
            runner.release([job])
            out.drop(job, None)
            continue
        job, window = candidates[0]
        preempt(scheduler, job, window)
        runner.release_sequence(job, window)
        out.drop(job, window)
        preempted += 1
        log.info("preempted request %s to free KV cache", job.id)


def victims(scheduler: Scheduler) -> list[tuple[Job, Window | None]]:
    """Sequences that hold a cache row, the most recently admitted first (a scoring window is one)."""
    held: list[tuple[int, Job, Window | None]] = [(j.admission, j, None) for j in (*scheduler.running, *scheduler.prefilling)]
    held += [(w.admission, j, w) for j in scheduler.scoring for w in j.pending if w.started]
    return [(job, window) for _, job, window in sorted(held, key=lambda h: -h[0])]


def preempt(scheduler: Scheduler, job: Job, window: Window | None) -> None:
    """Back to the queue (a window: back to its start), to be recomputed from its tokens; what it
    already booked stays booked. A generation request that sampled resumes with its next decode input."""
    if window is not None:
        window.done, window.started = 0, False
        return
    assert isinstance(job, GenerateJob)
    scheduler.drop([job])
    job.prefilled = 0
    job.input_ids = job.prompt_ids + job.tokens[:-1] if job.tokens else job.prompt_ids
    job.preemptions += 1
    scheduler.waiting.insert(0, job)
