"""What flows between the engine's parts in one step (no torch at import: the scheduler uses it).

scheduler.schedule() -> SchedulerOutput -> runner.run() -> RunnerOutput -> output processing ->
scheduler.update_from_output(SchedulerOutput, RunnerOutput, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.engine.requests import GenerateJob, Job, ScoreJob, Window

if TYPE_CHECKING:
    from torch import Tensor

    from model.step import StepOutput
    from server.engine.prefix_cache import CachedPrefix


@dataclass
class PrefillChunk:
    """Prompt tokens [start, end) of a generation request."""

    job: GenerateJob
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == len(self.job.input_ids)

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
class Reuse:
    """A row that starts from a cached prefix (taken at admission): its outputs are booked before its chunks."""

    job: Job
    window: Window | None  # the scoring window, None for a generation request
    prefix: CachedPrefix


@dataclass
class SchedulerOutput:
    decode: list[GenerateJob]
    prefill: list[PrefillChunk]
    score: list[ScoreChunk]
    expired: list[tuple[Job, str]]
    budget: int  # chunk tokens this step may spend
    reused: list[Reuse] = field(default_factory=list)

    def drop(self, job: Job, window: Window | None) -> None:
        """Take a preempted sequence's work out of this step."""
        self.decode = [j for j in self.decode if j is not job]
        self.prefill = [c for c in self.prefill if c.job is not job]
        self.score = [c for c in self.score if not (c.job is job and (window is None or c.window is window))]

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
class Part:
    """One request's tokens in the step: a decode token, a prompt chunk or a scoring chunk."""

    job: Job
    chunk: PrefillChunk | ScoreChunk | None  # None: a decode token
    key: tuple[str, int]  # the row's owner: (request id, window index or -1)
    tokens: list[int]
    logits_from: int  # logits wanted for the part's tokens [logits_from, len(tokens))
    row: int = -1
    logits: Tensor | None = None  # [n, V] the rows of the step's logits that are this part's
    output: StepOutput | None = None
    span: slice = field(default_factory=lambda: slice(0))  # the part's tokens in the flat batch
    start: int = 0  # the row's position before the part
    _logp: Tensor | None = None

    def log_probs(self) -> Tensor:
        """log-softmax of the part's logits in float32, computed once (the prefix cache and booking share it)."""
        if self._logp is None:
            import torch  # here: this module stays importable without torch

            assert self.logits is not None
            self._logp = torch.log_softmax(self.logits.float(), dim=-1)
        return self._logp

    @property
    def stage(self) -> str:
        return "score" if isinstance(self.chunk, ScoreChunk) else "model"

    def routing(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """operator [n, L], entropy [n, L] and gate [n] of the part's tokens (views)."""
        assert self.output is not None
        gate = None if self.output.gate is None else self.output.gate[self.span]
        return self.output.operator[self.span], self.output.entropy[self.span], gate


@dataclass
class RunnerOutput:
    decode: list[Part]
    prefill: list[Part]
    score: list[Part]
    failed: list[tuple[Job, str]]
    deferred: list[PrefillChunk | ScoreChunk]  # did not fit the KV cache this step
    seconds: float  # the forward, failures and retries included
    counts: list[list[list[int]]]  # [phase][L][4] tokens routed, phase 0 = decode, 1 = prefill and scoring
    gate: Tensor | None  # MetaRouter gate of every token
    executed_flops: float = 0.0
    dense_flops: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(len(p.tokens) for p in (*self.decode, *self.prefill, *self.score))
