"""What the scheduler's queues hold, read for status, retry estimates and draining (mixed into Scheduler)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.engine.cost_model import CostModel
from server.engine.requests import GenerateJob, Job, ScoreJob


@dataclass
class SchedulerStatus:
    waiting_generate: int
    waiting_score: int
    prefilling: int
    running: int
    scoring: int
    budget_tokens: int
    kv_reserved_bytes: int
    kv_budget_bytes: int
    retry_after: int


class QueueViews:
    """Views of the four queues: waiting, prefilling, running, scoring."""

    waiting: list[Job]
    prefilling: list[GenerateJob]
    running: list[GenerateJob]
    scoring: list[ScoreJob]
    cost: CostModel

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.scoring)

    def all_jobs(self) -> list[Job]:
        return [*self.waiting, *self.prefilling, *self.running, *self.scoring]

    def backlog_tokens(self) -> int:
        """Input tokens queued or admitted but not processed, plus tokens still to generate."""
        chunks = sum(j.remaining_tokens() for j in (*self.waiting, *self.prefilling, *self.scoring))
        new = sum(max(0, j.params.max_new_tokens - len(j.tokens)) for j in (*self.prefilling, *self.running))
        return chunks + new

    def retry_after(self) -> int:
        """Seconds until the backlog drains at the measured throughput (1..60)."""
        seconds = self.backlog_tokens() / self.cost.tokens_per_second + self.cost.decode_seconds(len(self.running))
        return max(1, min(60, math.ceil(seconds)))

    def drop(self, jobs: list[Job]) -> None:
        """Forget jobs wherever they are (failed, or preempted before they are queued again)."""
        gone = {id(j) for j in jobs}
        self.waiting = [j for j in self.waiting if id(j) not in gone]
        self.prefilling = [j for j in self.prefilling if id(j) not in gone]
        self.running = [j for j in self.running if id(j) not in gone]
        self.scoring = [j for j in self.scoring if id(j) not in gone]

    def waiting_counts(self) -> tuple[int, int]:
        """(generation, scoring) requests waiting for admission."""
        score = sum(isinstance(j, ScoreJob) for j in self.waiting)
        return len(self.waiting) - score, score
