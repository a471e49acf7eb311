"""The scheduler: queues, admission, the step budget and the fairness policy. Pure Python, no torch.

Every step decodes one token for every running sequence first. What is left of the step's token
budget goes to chunks of work: prompt prefill (generation lane) and scoring windows (scoring lane).
- Everything a step schedules runs in one forward (decode tokens, prompt chunks, scoring chunks).
  The budget comes from a latency target: (target step time - fixed cost - measured cost of the
  step's decode tokens) / measured seconds per chunk token, so the same setting fits a 2-core CPU
  and a GPU. With nothing decoding a step may take 4 targets (no stream to keep smooth).
- When both lanes have work each gets half the budget; a lane's unused share goes to the other.
- While sequences decode, scoring may lengthen a step to at most `score_stretch` times its
  decode-only time (`score_cap`): a perplexity flood cannot slow the streams down beyond that,
  while prompts of new generations keep the full budget (their time to first token).
- Within a lane, the request with the fewest input tokens left goes first, aged: a request that has
  waited as long as it takes to process N tokens counts N tokens shorter, so nothing starves.
- Long prompts and long scoring windows are cut into chunks that fit the lane's share; a prompt is
  never cut into a chunk or a remainder under MIN_CHUNK tokens (a short prompt goes whole).
- A generation request is admitted while the batch cap and the KV-cache budget allow: the bytes the
  running and prefilling sequences hold (measured, routed), plus what each may still add (its tokens
  to go times the measured share of attending tokens) must stay within the budget. The rest queue.
- A sequence takes its cache row when admitted (a scoring window: with its first chunk), starting from
  the longest cached prefix of its tokens (`PrefixHook`, the runner's prefix cache); only the rest is
  prefilled. When the running sequences outgrow the KV pool the engine preempts the most recently
  admitted one (server/engine/preemption.py): it goes back to the queue and is recomputed from its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from server.engine.cost_model import CostModel, StepStats
from server.engine.outputs import PrefillChunk, Reuse, RunnerOutput, SchedulerOutput, ScoreChunk
from server.engine.queues import QueueViews, SchedulerStatus
from server.engine.requests import GenerateJob, Job, ScoreJob, Unavailable, Window

MIN_CHUNK = 16  # no chunk smaller than this unless it ends the prompt, and no remainder smaller than this is left
MIN_SCORE_CHUNK = 4  # the scoring tokens a step carries however tight `score_cap` is
IDLE_STEP_FACTOR = 4  # with nothing decoding, a step may take this many step targets
# Routing varies with the text: one sequence's attending share can sit a few percent above the
# measured mean (0.63-0.68 against 0.63 on the test model), so admission reserves 10% above it.
KV_SHARE_HEADROOM = 1.1


@dataclass
class SchedulerLimits:
    max_batch_size: int
    queue_size: int
    max_step_tokens: int
    step_target_seconds: float
    kv_budget_bytes: int
    kv_bytes_per_token: float  # K+V of one token attending in every attention layer
    max_seq_len: int
    kv_rounding_bytes: float = 0.0  # a sequence's last, partly filled block in each attention layer
    score_stretch: float = 1.25  # while sequences decode, a step with scoring takes at most this x its decode-only time


class PrefixHook(Protocol):
    """The prefix cache as admission sees it (the engine wires the runner's in; no torch here)."""

    def peek(self, job: GenerateJob) -> int:
        """Input tokens a new row for the job would start with."""
        ...

    def attach(self, job: Job, window: Window | None) -> Any:
        """Take the sequence's row, started from its cached prefix: a CachedPrefix (`.tokens`) or None."""
        ...


@dataclass
class Scheduler(QueueViews):
    limits: SchedulerLimits
    cost: CostModel = field(default_factory=CostModel)
    waiting: list[Job] = field(default_factory=list)
    prefilling: list[GenerateJob] = field(default_factory=list)
    running: list[GenerateJob] = field(default_factory=list)
    scoring: list[ScoreJob] = field(default_factory=list)
    kv_share: float = 1.0  # measured cache entries per token, as a share of full attention
    kv_used_bytes: int = 0  # measured after the last step: what the sequences hold (cached prefixes alone can be evicted)
    prefix: PrefixHook | None = None
    admissions: int = 0  # admissions so far (a sequence's `admission` orders preemption)

    # ------------------------------------------------------------------ queue
    def add(self, jobs: list[Job]) -> None:
        """Queue jobs atomically, or raise Unavailable (preempted sequences back in the queue do not count)."""
        queued = sum(1 for j in self.waiting if j.admitted is None)
        if queued and queued + len(jobs) > self.limits.queue_size:
            raise Unavailable(f"queue is full ({queued} waiting, queue size {self.limits.queue_size})",
                              retry_after=self.retry_after())
        self.waiting.extend(jobs)

    # ------------------------------------------------------------------ budget
    def budget(self) -> int:
        if self.running:
            spare = self.limits.step_target_seconds - self.cost.decode_seconds(len(self.running))
        else:  # no stream to keep smooth: larger chunks, only a newcomer's first token waits for them
            spare = IDLE_STEP_FACTOR * self.limits.step_target_seconds - self.cost.fixed_seconds
        return self.cost.budget(spare, MIN_CHUNK, self.limits.max_step_tokens)

    def score_cap(self) -> int:
        """Scoring tokens a step may carry: while sequences decode, what keeps the step within
        `score_stretch` times its decode-only time (at least MIN_SCORE_CHUNK, so scoring progresses)."""
        if not self.running:
            return self.limits.max_step_tokens
        spare = (self.limits.score_stretch - 1.0) * self.cost.decode_seconds(len(self.running))
        return self.cost.budget(spare, MIN_SCORE_CHUNK, self.limits.max_step_tokens)

    def _reserve(self, job: GenerateJob, cached: int | None = None) -> float:
        """KV bytes a generation request may still add (measured share of attending tokens); `cached`: the
        input tokens it will start with (default: those in its row)."""
        done = job.prefilled if cached is None else cached
        todo = len(job.input_ids) - done + job.params.max_new_tokens - len(job.tokens)
        share = min(1.0, self.kv_share * KV_SHARE_HEADROOM)
        return min(todo, self.limits.max_seq_len) * self.limits.kv_bytes_per_token * share + self.limits.kv_rounding_bytes

    def kv_needed(self, tokens: int) -> int:
        """KV bytes a sequence of `tokens` tokens may hold alone: the measured attention share with admission's
        headroom, and its partly filled last blocks (what must fit the pool for it to run at all)."""
        share = min(1.0, self.kv_share * KV_SHARE_HEADROOM)
        return int(min(tokens, self.limits.max_seq_len) * self.limits.kv_bytes_per_token * share + self.limits.kv_rounding_bytes)

    def kv_reserved(self) -> int:
        return int(self.kv_used_bytes + sum(self._reserve(j) for j in (*self.prefilling, *self.running)))

    def _admissible(self, job: GenerateJob, reserved: float, cached: int) -> bool:
        if len(self.prefilling) + len(self.running) >= self.limits.max_batch_size:
            return False
        nothing_running = not (self.prefilling or self.running)  # a lone request always fits
        return nothing_running or reserved + self._reserve(job, cached) <= self.limits.kv_budget_bytes

    def _take_row(self, job: Job, window: Window | None, reused: list[Reuse]) -> None:
        """The sequence's cache row, from its cached prefix when there is one (the runner books nothing yet)."""
        self.admissions += 1
        if window is None:
            job.admission = self.admissions
        else:
            window.admission, window.started = self.admissions, True
        hit = self.prefix.attach(job, window) if self.prefix is not None else None
        if hit is None:
            return
        if window is None:
            job.prefilled = hit.tokens  # type: ignore[attr-defined]
        else:
            window.done = hit.tokens
        reused.append(Reuse(job, window, hit))

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

    def _generation_lane(self, share: int, now: float, chunks: list[PrefillChunk], reused: list[Reuse]) -> int:
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
                if not self._admissible(job, reserved, self.prefix.peek(job) if self.prefix is not None else 0):
                    continue
                self.waiting.remove(job)
                self.prefilling.append(job)
                job.admitted = job.admitted or now  # a preempted request keeps its first admission
                self._take_row(job, None, reused)
                reserved += self._reserve(job)
            n = chunk_size(job.remaining_tokens(), share - used)
            if n:
                chunks.append(PrefillChunk(job, job.prefilled, job.prefilled + n))
                used += n
        return used

    def _scoring_lane(self, share: int, now: float, chunks: list[ScoreChunk], reused: list[Reuse]) -> int:
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
                if not window.started:
                    self._take_row(job, window, reused)
                n = min(window.length - window.done, share - used)
                chunks.append(ScoreChunk(job, window, window.done, window.done + n))
                used += n
        return used

    def schedule(self, now: float) -> SchedulerOutput:
        expired = self._expire(now)
        budget = self.budget()
        prefill: list[PrefillChunk] = []
        score: list[ScoreChunk] = []
        reused: list[Reuse] = []
        gen_work = bool(self.prefilling) or any(isinstance(j, GenerateJob) for j in self.waiting)
        score_work = bool(self.scoring) or any(isinstance(j, ScoreJob) for j in self.waiting)
        gen_share = budget // 2 if (gen_work and score_work) else budget
        used = self._generation_lane(gen_share, now, prefill, reused)
        used += self._scoring_lane(min(budget - used, self.score_cap()), now, score, reused)
        if used < budget:  # the scoring lane left some of its share
            used += self._generation_lane(budget - used, now, prefill, reused)
        return SchedulerOutput(list(self.running), prefill, score, expired, budget, reused)

    # ------------------------------------------------------------------ preemption
    # ------------------------------------------------------------------ update
    def update_from_output(self, out: SchedulerOutput, ro: RunnerOutput, finished: list[Job], started: list[GenerateJob],
                           kv_used_bytes: int, kv_sample: tuple[int, int]) -> None:
        """Advance the cursors of the chunks that ran (not those deferred), move requests between
        phases, learn the costs and the attending share (kv_sample: cache entry bytes, tokens seen)."""
        del out  # what ran is in the runner's output; the rest (deferred, failed) did not advance
        for part in ro.prefill:
            part.chunk.job.prefilled = part.chunk.end  # type: ignore[union-attr]
        for part in ro.score:
            sc = part.chunk
            assert isinstance(sc, ScoreChunk)
            sc.window.done = sc.end
            if sc.last and sc.window in sc.job.pending:
                sc.job.pending.remove(sc.window)
        gone = {id(j) for j in finished}
        begun = {id(j) for j in started}
        self.prefilling = [j for j in self.prefilling if id(j) not in gone and id(j) not in begun]
        self.running = [j for j in self.running if id(j) not in gone] + [j for j in started if id(j) not in gone]
        self.scoring = [j for j in self.scoring if id(j) not in gone]
        if ro.tokens:
            self.cost.observe(StepStats(len(ro.decode), ro.tokens - len(ro.decode), ro.seconds))
        self.kv_used_bytes = kv_used_bytes
        entry_bytes, tokens = kv_sample
        if tokens:
            measured = entry_bytes / (tokens * self.limits.kv_bytes_per_token)
            self.kv_share = min(1.0, max(0.05, 0.8 * self.kv_share + 0.2 * measured))

    def status(self) -> SchedulerStatus:
        waiting_generate, waiting_score = self.waiting_counts()
        return SchedulerStatus(
            waiting_generate=waiting_generate, waiting_score=waiting_score,
            prefilling=len(self.prefilling), running=len(self.running), scoring=len(self.scoring),
            budget_tokens=self.budget(), kv_reserved_bytes=self.kv_reserved(), kv_budget_bytes=self.limits.kv_budget_bytes,
            retry_after=self.retry_after(),
        )


def chunk_size(remaining: int, room: int) -> int:
    """Prompt tokens to take now: what fits `room`, but never a chunk or a remainder under MIN_CHUNK
    unless it ends the prompt (so a short prompt goes whole, in the step it starts in)."""
    n = min(remaining, max(room, 0))
    if remaining - n < MIN_CHUNK:
        return remaining
    return n if n >= MIN_CHUNK else 0
