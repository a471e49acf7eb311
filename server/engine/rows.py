"""Which cache row each request holds, and the prefix cache's hook for the scheduler.

Rows are keyed by request id, and by (request id, window) for scoring windows; a row is taken at a
request's first chunk (`attach`, starting from the longest usable cached prefix of its tokens) and given
back when it ends, fails, is cancelled or preempted.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.kv_cache import PagedKVCache
from server.engine.costs import cost_cached
from server.engine.prefix_cache import CachedPrefix, PrefixCache
from server.engine.requests import GenerateJob, Job, ScoreJob, Window


@dataclass
class PrefixStats:
    """What the prefix cache did for clients' sequences (a recompute after preemption is not counted)."""

    queries: int = 0  # input tokens looked up
    hits: int = 0  # of those, tokens taken from the cache


class RowTable:
    """The rows requests hold in one PagedKVCache (the scheduler's PrefixHook: peek, attach, holds)."""

    def __init__(self, cache: PagedKVCache, prefix: PrefixCache | None) -> None:
        self.cache = cache
        self.prefix = prefix
        self.stats = PrefixStats()
        self.rows: dict[tuple[str, int], int] = {}

    def _free(self, key: tuple[str, int]) -> None:
        row = self.rows.pop(key, None)
        if row is None:
            return
        if self.prefix is not None:
            self.prefix.release_row(row)
        self.cache.free(row)

    def release(self, jobs: list[Job]) -> None:
        """Give back every row the jobs hold (finished, failed or cancelled)."""
        ids = {j.id for j in jobs}
        for key in [k for k in self.rows if k[0] in ids]:
            self._free(key)

    def release_window(self, job: ScoreJob, window: int) -> None:
        self._free((job.id, window))

    def release_sequence(self, job: Job, window: Window | None) -> None:
        """Give back one sequence's row (a preempted one)."""
        self._free((job.id, -1 if window is None else window.index))

    def holds(self, job: Job, window: Window | None) -> bool:
        return (job.id, -1 if window is None else window.index) in self.rows

    def row_of(self, job: Job) -> int | None:
        return self.rows.get((job.id, -1))

    # ------------------------------------------------------------------ the prefix cache (the scheduler's PrefixHook)
    @staticmethod
    def _sequence(job: Job, window: Window | None) -> tuple[list[int], bool, int]:
        """A sequence's tokens to look up, whether a cached prefix must carry log-probabilities for it, and how
        many of the tokens are its inputs (a window's last target follows them: a block it completes counts)."""
        if window is not None:
            assert isinstance(job, ScoreJob)
            return job.seqs[window.seq][window.begin: window.end + 1], True, window.length
        assert isinstance(job, GenerateJob)
        return job.input_ids, job.params.prompt_logprobs is not None and job.booked < len(job.prompt_ids) - 1, len(job.input_ids)

    def peek(self, job: GenerateJob) -> int:
        return 0 if self.prefix is None else self.prefix.peek(*self._sequence(job, None)[:2])

    def attach(self, job: Job, window: Window | None) -> CachedPrefix | None:
        """The sequence's row, started from the longest usable cached prefix of its tokens."""
        key = (job.id, -1 if window is None else window.index)
        assert key not in self.rows
        row = self.rows[key] = self.cache.allocate()
        if self.prefix is None:
            return None
        ids, outputs, inputs = self._sequence(job, window)
        hit = self.prefix.attach(row, ids, outputs, inputs)
        if hit is not None:
            cost_cached(job, window, hit)
        cached = hit.tokens if hit is not None else 0
        if window is not None and not window.queried:
            window.queried = True
            self.stats.queries, self.stats.hits = self.stats.queries + inputs, self.stats.hits + cached
            job.cached_tokens[window.seq] += cached  # type: ignore[attr-defined]
        elif isinstance(job, GenerateJob) and job.preemptions == 0:
            self.stats.queries, self.stats.hits = self.stats.queries + len(ids), self.stats.hits + cached
            job.cached_tokens = cached
        return hit

    def make_room(self, blocks: int) -> bool:
        """At least `blocks` free blocks, evicting cached prefixes if needed; False if even that is not enough."""
        if self.prefix is None:
            return self.cache.free_blocks >= blocks
        return self.prefix.make_room(blocks)
