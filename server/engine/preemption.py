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
from server.engine.requests import Job, Window
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
        victims = [(job, window) for job, window in scheduler.victims()
                   if runner.holds(job, window) and not (owner and job is owner[0] and window is owner[1])]
        if not victims:
            assert owner is not None  # decoding sequences hold rows, so they would be victims
            job = owner[0]
            job.fail("kv_cache_exceeded", "the sequence needs more KV cache than the server's budget holds "
                     f"({scheduler.limits.kv_budget_bytes / 2**20:.2f} MiB, --kv-cache-mb)")
            scheduler.drop([job])
            runner.release([job])
            out.drop(job, None)
            continue
        job, window = victims[0]
        scheduler.preempt(job, window)
        runner.release_sequence(job, window)
        out.drop(job, window)
        preempted += 1
        log.info("preempted request %s to free KV cache", job.id)
