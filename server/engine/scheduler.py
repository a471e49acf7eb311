"""The scheduler: queues, admission, the step budget and the fairness policy. Pure Python, no torch.

Every step decodes one token for every running sequence first. What is left of the step's token
budget goes to chunks of work: prompt prefill (generation lane) and scoring windows (scoring lane).
- The budget comes from a latency target: (target step time - measured decode time - fixed cost of
  a forward) / measured seconds per chunk token, so the same setting fits a 2-core CPU and a GPU.
  With nothing decoding a step may take 4 targets (no stream to keep smooth).
- When both lanes have work each gets half the budget; a lane's unused share goes to the other.
- Within a lane, the request with the fewest input tokens left goes first, aged: a request that has
  waited as long as it takes to process N tokens counts N tokens shorter, so nothing starves.
- Long prompts and long scoring windows are cut into chunks that fit the lane's share.
- A generation request is admitted while the batch cap and the KV-cache budget allow: the bytes the
  running and prefilling sequences hold (measured, routed), plus what each may still add (its tokens
  to go times the measured share of attending tokens) must stay within the budget. The rest queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from server.engine.requests import GenerateJob, Job, ScoreJob, Unavailable, Window

MIN_CHUNK = 16  # smallest chunk worth a forward of its own
IDLE_STEP_FACTOR = 4  # with nothing decoding, a step may take this many step targets
# Routing varies with the text: one sequence's attending share can sit a few percent above the
# measured mean (0.63-0.68 against 0.63 on the test model), so admission reserves 10% above it.
KV_SHARE_HEADROOM = 1.1


@dataclass
class PrefillChunk:
    """Prompt tokens [start, end) of a generation request."""

    job: GenerateJob
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == len(self.job.prompt_ids)

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.last


@dataclass
class ScoreChunk:
    """Inputs [start, end) (relative to the window) of one scoring window."""

    job: ScoreJob
    window: Window
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == self.window.length

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.last


@dataclass
class SchedulerOutput:
    decode: list[GenerateJob]
    prefill: list[PrefillChunk]
    score: list[ScoreChunk]
    expired: list[tuple[Job, str]]
    budget: int  # chunk tokens this step may spend

    @property
    def prefill_tokens(self) -> int:
        return sum(c.end - c.start for c in self.prefill)

    @property
    def score_tokens(self) -> int:
        return sum(c.end - c.start for c in self.score)

    @property
    def empty(self) -> bool:
        return not (self.decode or self.prefill or self.score)


@dataclass
class StepStats:
    """What one step cost (the runner measures, the scheduler learns)."""

    decode_batch: int
    decode_seconds: float
    chunk_tokens: int
    chunk_seconds: float


@dataclass
class SchedulerLimits:
    max_batch_size: int
    queue_size: int
    max_step_tokens: int
    step_target_seconds: float
    kv_budget_bytes: int
    kv_bytes_per_token: float  # K+V of one token attending in every attention layer
    max_seq_len: int


@dataclass
class CostModel:
    """Measured costs: decode step time (moving average), and chunk time as fixed + per-token cost,
    fitted by least squares with exponential forgetting over the steps' (tokens, seconds)."""

    chunk_seconds_per_token: float = 2e-4
    chunk_fixed_seconds: float = 0.0
    decode_seconds: float = 0.0
    alpha: float = 0.1
    samples: int = 0
    _n: float = 0.0
    _t: float = 0.0
    _nn: float = 0.0
    _nt: float = 0.0

    def observe(self, stats: StepStats) -> None:
        if stats.decode_batch:
            self.decode_seconds += self.alpha * (stats.decode_seconds - self.decode_seconds)
        n, t = float(stats.chunk_tokens), stats.chunk_seconds
        if n <= 0:
            return
        a = self.alpha if self.samples else 1.0
        self._n += a * (n - self._n)
        self._t += a * (t - self._t)
        self._nn += a * (n * n - self._nn)
        self._nt += a * (n * t - self._nt)
        self.samples += 1
        var = self._nn - self._n ** 2
        slope = (self._nt - self._n * self._t) / var if var > 1e-6 * max(self._nn, 1.0) else 0.0
        if slope > 0:
            self.chunk_seconds_per_token = slope
            self.chunk_fixed_seconds = max(0.0, self._t - slope * self._n)
        else:  # one chunk size so far (or noise): all of it per token
            self.chunk_seconds_per_token = max(self._t / self._n, 1e-9)
            self.chunk_fixed_seconds = 0.0

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / max(self.chunk_seconds_per_token, 1e-9)

    def budget(self, spare_seconds: float, least: int, most: int) -> int:
        """Chunk tokens that fit `spare_seconds`, but never so few that the fixed cost of a forward
        outweighs its tokens (then throughput, not the step time, would collapse)."""
        per_token = max(self.chunk_seconds_per_token, 1e-9)
        fit = (spare_seconds - self.chunk_fixed_seconds) / per_token
        amortised = self.chunk_fixed_seconds / per_token
        return int(max(least, min(most, max(fit, amortised))))


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


@dataclass
class Scheduler:
    limits: SchedulerLimits
    cost: CostModel = field(default_factory=CostModel)
    waiting: list[Job] = field(default_factory=list)
    prefilling: list[GenerateJob] = field(default_factory=list)
    running: list[GenerateJob] = field(default_factory=list)
    scoring: list[ScoreJob] = field(default_factory=list)
    kv_share: float = 1.0  # measured cache entries per token, as a share of full attention
    kv_used_bytes: int = 0  # measured after the last step

    # ------------------------------------------------------------------ queue
    def add(self, jobs: list[Job]) -> None:
        """Queue jobs atomically, or raise Unavailable."""
        if self.waiting and len(self.waiting) + len(jobs) > self.limits.queue_size:
            raise Unavailable(f"queue is full ({len(self.waiting)} waiting, queue size {self.limits.queue_size})",
                              retry_after=self.retry_after())
        self.waiting.extend(jobs)

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
        seconds = self.backlog_tokens() / self.cost.tokens_per_second + len(self.running) * self.cost.decode_seconds
        seconds += self.cost.chunk_fixed_seconds * len(self.waiting)
        return max(1, min(60, math.ceil(seconds)))

    # ------------------------------------------------------------------ budget
    def budget(self) -> int:
        if self.running:
            spare = self.limits.step_target_seconds - self.cost.decode_seconds
        else:  # no stream to keep smooth: larger chunks, only a newcomer's first token waits for them
            spare = IDLE_STEP_FACTOR * self.limits.step_target_seconds
        return self.cost.budget(spare, MIN_CHUNK, self.limits.max_step_tokens)

    def _reserve(self, job: GenerateJob) -> float:
        """KV bytes a generation request may still add (measured share of attending tokens)."""
        todo = len(job.prompt_ids) - job.prefilled + job.params.max_new_tokens - len(job.tokens)
        return min(todo, self.limits.max_seq_len) * self.limits.kv_bytes_per_token * min(1.0, self.kv_share * KV_SHARE_HEADROOM)

    def kv_needed(self, tokens: int) -> int:
        """KV bytes a sequence of `tokens` tokens holds at the measured attention share."""
        return int(min(tokens, self.limits.max_seq_len) * self.limits.kv_bytes_per_token * self.kv_share)

    def kv_reserved(self) -> int:
        return int(self.kv_used_bytes + sum(self._reserve(j) for j in (*self.prefilling, *self.running)))

    def _admissible(self, job: GenerateJob, reserved: float) -> bool:
        if len(self.prefilling) + len(self.running) >= self.limits.max_batch_size:
            return False
        nothing_running = not (self.prefilling or self.running)  # a lone request always fits
        return nothing_running or reserved + self._reserve(job) <= self.limits.kv_budget_bytes

    # ------------------------------------------------------------------ schedule
    def _key(self, job: Job, now: float) -> float:
        return job.remaining_tokens() - (now - job.arrival) * self.cost.tokens_per_second

    def _expire(self, now: float) -> list[tuple[Job, str]]:
        expired: list[tuple[Job, str]] = []

        def keep(job: Job) -> bool:
            reason = job.cancel_reason or ("timeout" if now > job.deadline else None)
            if reason:
                expired.append((job, reason))
            return reason is None

        self.waiting = [j for j in self.waiting if keep(j)]
        self.prefilling = [j for j in self.prefilling if keep(j)]
        self.running = [j for j in self.running if keep(j)]
        self.scoring = [j for j in self.scoring if keep(j)]
        return expired

    def _generation_lane(self, share: int, now: float, chunks: list[PrefillChunk]) -> int:
        """Prefill chunks within `share` tokens; returns the tokens used."""
        used = 0
        reserved = float(self.kv_reserved())
        candidates = [*self.prefilling, *(j for j in self.waiting if isinstance(j, GenerateJob))]
        taken = {id(c.job) for c in chunks}
        for job in sorted(candidates, key=lambda j: self._key(j, now)):
            if used >= share:
                break
            if id(job) in taken:
                continue
            if job not in self.prefilling:
                if not self._admissible(job, reserved):
                    continue
                self.waiting.remove(job)
                self.prefilling.append(job)
                job.admitted = now
                reserved += self._reserve(job)
            n = min(job.remaining_tokens(), share - used)
            chunks.append(PrefillChunk(job, job.prefilled, job.prefilled + n))
            used += n
        return used

    def _scoring_lane(self, share: int, now: float, chunks: list[ScoreChunk]) -> int:
        used = 0
        candidates = [*self.scoring, *(j for j in self.waiting if isinstance(j, ScoreJob))]
        for job in sorted(candidates, key=lambda j: self._key(j, now)):
            if used >= share:
                break
            if job not in self.scoring:
                self.waiting.remove(job)
                self.scoring.append(job)
                job.admitted = now
            busy = {id(c.window) for c in chunks}
            for window in job.pending:
                if used >= share:
                    break
                if id(window) in busy:
                    continue
                n = min(window.length - window.done, share - used)
                chunks.append(ScoreChunk(job, window, window.done, window.done + n))
                used += n
        return used

    def schedule(self, now: float) -> SchedulerOutput:
        expired = self._expire(now)
        budget = self.budget()
        prefill: list[PrefillChunk] = []
        score: list[ScoreChunk] = []
        gen_work = bool(self.prefilling) or any(isinstance(j, GenerateJob) for j in self.waiting)
        score_work = bool(self.scoring) or any(isinstance(j, ScoreJob) for j in self.waiting)
        gen_share = budget // 2 if (gen_work and score_work) else budget
        used = self._generation_lane(gen_share, now, prefill)
        used += self._scoring_lane(budget - used, now, score)
        if used < budget:  # the scoring lane left some of its share
            used += self._generation_lane(budget - used, now, prefill)
        return SchedulerOutput(list(self.running), prefill, score, expired, budget)

    # ------------------------------------------------------------------ update
    def update_from_output(self, out: SchedulerOutput, stats: StepStats, finished: list[Job],
                           started: list[GenerateJob], kv_used_bytes: int, kv_tokens: int) -> None:
        """Advance cursors, move requests between phases, learn the costs."""
        for chunk in out.prefill:
            chunk.job.prefilled = chunk.end
        for sc in out.score:
            sc.window.done = sc.end
            if sc.last and sc.window in sc.job.pending:
                sc.job.pending.remove(sc.window)
        gone = {id(j) for j in finished}
        begun = {id(j) for j in started}
        self.prefilling = [j for j in self.prefilling if id(j) not in gone and id(j) not in begun]
        self.running = [j for j in self.running if id(j) not in gone] + [j for j in started if id(j) not in gone]
        self.scoring = [j for j in self.scoring if id(j) not in gone]
        self.cost.observe(stats)
        self.kv_used_bytes = kv_used_bytes
        if kv_tokens:
            measured = kv_used_bytes / (kv_tokens * self.limits.kv_bytes_per_token)
            self.kv_share = min(1.0, max(0.05, 0.8 * self.kv_share + 0.2 * measured))

    def drop(self, jobs: list[Job]) -> None:
        """Forget failed jobs wherever they are."""
        gone = {id(j) for j in jobs}
        self.waiting = [j for j in self.waiting if id(j) not in gone]
        self.prefilling = [j for j in self.prefilling if id(j) not in gone]
        self.running = [j for j in self.running if id(j) not in gone]
        self.scoring = [j for j in self.scoring if id(j) not in gone]

    def status(self) -> SchedulerStatus:
        return SchedulerStatus(
            waiting_generate=sum(isinstance(j, GenerateJob) for j in self.waiting),
            waiting_score=sum(isinstance(j, ScoreJob) for j in self.waiting),
            prefilling=len(self.prefilling), running=len(self.running), scoring=len(self.scoring),
            budget_tokens=self.budget(), kv_reserved_bytes=self.kv_reserved(), kv_budget_bytes=self.limits.kv_budget_bytes,
            retry_after=self.retry_after(),
        )
