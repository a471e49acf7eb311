"""What flows between the routes and the engine: requests (jobs), their events and results.

A route builds jobs, submits them, and reads typed events from one asyncio.Queue per request; the
engine thread posts them with `Job.post` (thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the scheduler imports this module and stays free of torch
    import torch

    from model import FinishReason, StoppingCriteria
    from server.textstream import TextStream


@dataclass
class RequestCost:
    """Routing totals of a request (or of one step) across forwards, priced when asked.

    Pricing is linear in token counts and attended pairs, so the sum of many forwards' tables prices
    exactly as the sum of their prices."""

    counts: np.ndarray | None = None  # [L, 4] tokens per layer and operator id
    pairs: np.ndarray | None = None  # [L] attended (query, key) pairs
    tokens: int = 0  # tokens fed through the model
    dense_pairs: float = 0.0  # pairs a full-attention model would attend for them
    heads: int = 0  # positions whose logits were computed

    def add(self, counts: np.ndarray, pairs: np.ndarray, tokens: int, start: int, heads: int) -> None:
        """One forward's share: `tokens` new tokens after `start` earlier ones of the same sequence."""
        if self.counts is None or self.pairs is None:
            self.counts, self.pairs = counts.astype(np.int64), pairs.astype(np.float64)
        else:
            self.counts += counts
            self.pairs += pairs
        self.add_tokens(tokens, start, heads)

    def add_tokens(self, tokens: int, start: int, heads: int) -> None:
        """The token totals of `add` alone (a step's sum has its tables already)."""
        self.tokens += tokens
        self.dense_pairs += tokens * start + tokens * (tokens + 1) / 2
        self.heads += heads

    def price(self, model: Any) -> tuple[float, float]:
        """(executed, dense-equivalent) FLOPs, the LM head included."""
        from model import flops as fl  # here, not at the top: the scheduler imports this module without torch
        from model.accounting import dense_flops, linear_price

        cfg = model.config
        head = fl.lm_head_flops(cfg.d_model, cfg.vocab_size, self.heads)
        if self.counts is None or self.pairs is None:
            return head, head
        executed = linear_price(model)(self.counts, self.pairs)
        return executed + head, dense_flops(cfg.d_model, cfg.d_ff, cfg.n_layers, self.tokens, self.dense_pairs) + head


class Unavailable(Exception):
    """The engine cannot take the request now (queue full, warming up, draining)."""

    def __init__(self, message: str, retry_after: int, reason: str = "overloaded") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


@dataclass
class GenParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: None = none, n = sampled token + top n
    prompt_logprobs: int | None = None  # same for the prompt tokens (echo)
    return_routing: bool = False


@dataclass
class LogprobEntry:
    """One token's log-probability, and the top alternatives when asked (id -> logprob)."""

    id: int
    logprob: float
    top: dict[int, float] | None = None


@dataclass
class RoutingTrace:
    """Per processed token: operator id per layer, entropy per layer (None where not computed), gate."""

    operator: list[list[int]] = field(default_factory=list)
    entropy: list[list[float | None]] = field(default_factory=list)
    gate: list[float | None] = field(default_factory=list)


@dataclass
class GenerationResult:
    finish_reason: FinishReason
    token_ids: list[int]
    text: str
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    ttft_seconds: float | None
    total_seconds: float
    flops_executed: float
    flops_dense: float
    routing: RoutingTrace | None
    prompt_logprobs: list[LogprobEntry] | None
    token_logprobs: list[LogprobEntry] | None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache


@dataclass
class ScoreResult:
    logprobs: list[list[float]]  # per sequence, one per token after the first
    top: list[list[dict[int, float] | None]] | None
    counts: list[list[list[int]]]  # per sequence: [layer][operator] scored tokens
    windows: list[int]
    queue_seconds: float
    total_seconds: float
    routing: list[RoutingTrace] | None = None  # per sequence, per input position (return_routing)
    flops: list[list[float]] | None = None  # per sequence: [executed, dense]
    cached_tokens: list[int] | None = None  # per sequence: input tokens taken from the prefix cache


@dataclass
class PromptEvent:
    index: int
    logprobs: list[LogprobEntry]


@dataclass
class TokenEvent:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[LogprobEntry] | None = None


@dataclass
class DoneEvent:
    index: int
    result: GenerationResult | ScoreResult


@dataclass
class ErrorEvent:
    index: int
    reason: str  # "timeout" | "cancelled" | "internal" | "shutdown" | "invalid"
    message: str


Event = PromptEvent | TokenEvent | DoneEvent | ErrorEvent


class Outbox:
    """Events of one engine step, handed to each event loop in one call (one wake-up per step, not per token)."""

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}

    def put(self, job: Job, event: Event) -> None:
        self._items.setdefault(job.loop, []).append((job.queue, event))

    def flush(self) -> None:
        items, self._items = self._items, {}
        for loop, pairs in items.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone (shutdown)
                loop.call_soon_threadsafe(_deliver, pairs)


def _deliver(pairs: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in pairs:
        queue.put_nowait(event)


class Job:
    """A unit of work for the engine; events go to an asyncio.Queue on the caller's loop."""

    kind = "job"

    def __init__(self, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop, index: int, timeout: float) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.queue = queue
        self.loop = loop
        self.index = index
        self.arrival = time.perf_counter()
        self.deadline = self.arrival + timeout
        self.admitted: float | None = None
        self.admission = 0  # order of the latest admission (preemption frees the most recent first)
        self.wait_recorded = False  # queue wait observed in the metrics
        self.outbox: Outbox | None = None  # set by the engine: events leave once per step
        # only the final event reaches the caller (a non-streamed request, vLLM's FINAL_ONLY outputs): the
        # event loop is not woken every step to take tokens nobody reads, which cost the engine thread the GIL
        self.final_only = False
        self.cancel_reason: str | None = None
        self.done = False

    def post(self, event: Event) -> None:
        if self.final_only and not isinstance(event, (DoneEvent, ErrorEvent)):
            return
        if self.outbox is not None:
            self.outbox.put(self, event)
            return
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone (shutdown)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def fail(self, reason: str, message: str) -> None:
        if not self.done:
            self.done = True
            self.post(ErrorEvent(self.index, reason, message))

    def remaining_tokens(self) -> int:
        """Input tokens still to process (the scheduler's shortest-remaining-first key)."""
        raise NotImplementedError

    def cost_of(self, seq: int) -> RequestCost:
        """The routing totals of sequence `seq` (the runner adds each forward's share; priced at the end)."""
        raise NotImplementedError


class GenerateJob(Job):
    kind = "generate"

    def __init__(self, prompt_ids: list[int], params: GenParams, **kw: Any) -> None:
        super().__init__(**kw)
        self.prompt_ids = prompt_ids
        self.params = params
        # what prefill feeds: the prompt, or after a preemption the prompt and the tokens generated but the last
        # (the last sampled token is the next decode input), recomputed from the prefix cache where it can
        self.input_ids = prompt_ids
        self.prefilled = 0  # input tokens already in the cache
        self.booked = 0  # prompt positions whose routing, logprobs and counts are booked (a recompute books none twice)
        self.costed = 0  # positions whose routing is in `cost` (a cached prefix is priced as if computed, a recompute not again)
        self.cached_tokens = 0  # prompt tokens the first admission took from the prefix cache
        self.preemptions = 0
        self.tokens: list[int] = []
        self.token_logprobs: list[LogprobEntry] = []
        self.prompt_logprobs: list[LogprobEntry] | None = [] if params.prompt_logprobs is not None else None
        self.routing: RoutingTrace | None = RoutingTrace() if params.return_routing else None
        self.cost = RequestCost()  # written by the runner only
        self.first_token: float | None = None
        self.last_token: float | None = None
        # set once by the output processor when the prompt is in the cache
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None
        self.criteria: StoppingCriteria | None = None

    def remaining_tokens(self) -> int:
        return len(self.input_ids) - self.prefilled

    @property
    def resumed(self) -> bool:
        """Preempted after sampling: its prefill recomputes the cache and samples nothing."""
        return bool(self.tokens)

    def cost_of(self, seq: int) -> RequestCost:
        return self.cost


@dataclass
class Window:
    """One scoring window (a model.scoring.Span) of sequence `seq`, with the engine's progress on it:
    inputs ids[begin:end], targets ids[score_from:end + 1]."""

    index: int  # among the job's windows (the runner's row key)
    seq: int  # index into the job's sequences
    begin: int
    end: int
    score_from: int  # first target index (into ids) this window scores
    done: int = 0  # inputs of this window already processed (chunked windows)
    booked: int = 0  # inputs of this window whose outputs are booked (a recompute after preemption books none twice)
    costed: int = 0  # inputs of this window whose routing is in the sequence's cost (as GenerateJob.costed)
    started: bool = False  # holds a cache row (looked up in the prefix cache when it took it)
    admission: int = 0  # order of the row's admission (preemption frees the most recent first)
    queried: bool = False  # counted once in the prefix-cache queries and the cached tokens

    @property
    def length(self) -> int:
        return self.end - self.begin


class ScoreJob(Job):
    """Log-likelihood of each token of each sequence (BOS first), sliding windows beyond the context."""

    kind = "score"

    def __init__(self, seqs: list[list[int]], window: int, stride: int, top_n: int | None, routing: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.seqs = seqs
        self.top_n = top_n
        # per input position (all but the last token): filled by the window that scores the next token
        self.routing = [RoutingTrace([[]] * (len(ids) - 1), [[]] * (len(ids) - 1), [None] * (len(ids) - 1))
                        for ids in seqs] if routing else None
        self.logprobs = [[0.0] * (len(ids) - 1) for ids in seqs]
        self.top: list[list[dict[int, float] | None]] | None = [[None] * (len(ids) - 1) for ids in seqs] if top_n else None
        self.counts: list[Any] = [None] * len(seqs)  # per sequence: [layers, operators] counts (torch)
        self.n_windows = [0] * len(seqs)
        self.costs = [RequestCost() for _ in seqs]  # per sequence, written by the runner only
        self.cached_tokens = [0] * len(seqs)  # per sequence: inputs taken from the prefix cache
        self.pending: deque[Window] = deque()
        from model.scoring import plan_windows  # here, not at the top: the scheduler imports this module without torch

        for s, ids in enumerate(seqs):
            spans = plan_windows(len(ids), window, stride)
            first = len(self.pending)
            self.pending.extend([Window(first + k, s, span.begin, span.end, span.score_from) for k, span in enumerate(spans)])
            self.n_windows[s] = len(spans)
        self.windows_left = len(self.pending)

    def remaining_tokens(self) -> int:
        return sum(w.length - w.done for w in self.pending)

    def cost_of(self, seq: int) -> RequestCost:
        return self.costs[seq]
