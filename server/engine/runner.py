"""The model runner: one forward per engine step, over the paged routed KV cache it owns.

A step's decode tokens, prompt chunks and scoring chunks are flat tokens of their cache rows and go
through `ChiarLM.forward_step` together (vLLM v1's one forward per step): eight new prompts cost one
forward, not eight. The runner alone knows which row each request holds (`rows`, keyed by request
id, and by (request id, window) for scoring windows); a row is taken at a request's first chunk and
given back when it ends. A step takes what fits the cache's free blocks; chunks that do not fit wait
(`deferred`). A forward that raises is rerun per request on a restored cache to find the culprit;
only the culprit fails.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from model.accounting import attended_pairs
from model.kv_cache import PagedKVCache
from model.step import StepOutput, TokenBatch
from server.engine.outputs import Part, PrefillChunk, RunnerOutput, SchedulerOutput, ScoreChunk
from server.engine.requests import GenerateJob, Job, RequestCost, ScoreJob

log = logging.getLogger("server.engine")


class InjectedFault(RuntimeError):
    """Raised on purpose (CHIAR_FAULT_INJECT) to test failure isolation."""


@dataclass
class FaultInjector:
    """Test hook: any request whose input contains `token_id` fails at `stage` (model, sample, score)."""

    stage: str | None = None
    token_id: int = -1

    @staticmethod
    def parse(spec: str | None) -> FaultInjector:
        if not spec:
            return FaultInjector()
        stage, _, token = spec.partition(":")
        return FaultInjector(stage, int(token))

    def check(self, stage: str, ids: list[int]) -> None:
        if self.stage == stage and self.token_id in ids:
            raise InjectedFault(f"injected {stage} fault")


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, faults: FaultInjector, serial_below: int = 0) -> None:
        self.model = model
        self.cache = cache
        self.faults = faults
        self.serial_below = serial_below  # steps of fewer tokens run on one thread
        self.threads = torch.get_num_threads()
        self.device = next(model.parameters()).device
        self.rows: dict[tuple[str, int], int] = {}

    # ------------------------------------------------------------------ rows
    def release(self, jobs: list[Job]) -> None:
        """Give back every row the jobs hold (finished, failed or cancelled)."""
        ids = {j.id for j in jobs}
        for key in [k for k in self.rows if k[0] in ids]:
            self.cache.free(self.rows.pop(key))

    def release_window(self, job: ScoreJob, window: int) -> None:
        row = self.rows.pop((job.id, window), None)
        if row is not None:
            self.cache.free(row)

    def row_of(self, job: Job) -> int | None:
        return self.rows.get((job.id, -1))

    # ------------------------------------------------------------------ step
    def run(self, out: SchedulerOutput) -> RunnerOutput:
        t0 = time.perf_counter()
        parts = [self._decode_part(j) for j in out.decode] + [self._prefill_part(c) for c in out.prefill]
        parts += [self._score_part(c) for c in out.score]
        parts, deferred = self._fit(parts)
        failed: list[tuple[Job, str]] = []
        step = self._forward_isolated(parts, failed)
        ran = [p for p in parts if p.output is not None]
        result = RunnerOutput([p for p in ran if p.chunk is None], [p for p in ran if isinstance(p.chunk, PrefillChunk)],
                              [p for p in ran if isinstance(p.chunk, ScoreChunk)], failed, deferred, time.perf_counter() - t0,
                              [], None if step is None else step.gate)
        if step is not None:
            self._account(ran, step, result)
        return result

    def _decode_part(self, job: GenerateJob) -> Part:
        return Part(job, None, (job.id, -1), [job.tokens[-1]], 0)

    def _prefill_part(self, chunk: PrefillChunk) -> Part:
        job = chunk.job
        want_all = job.params.prompt_logprobs is not None
        n = chunk.end - chunk.start
        return Part(job, chunk, (job.id, -1), job.prompt_ids[chunk.start:chunk.end], 0 if want_all else n if not chunk.last else n - 1)

    def _score_part(self, chunk: ScoreChunk) -> Part:
        w = chunk.window
        ids = chunk.job.seqs[w.seq]
        first = w.begin + chunk.start  # input position of the chunk's first token
        scored_from = max(w.score_from - 1, first) - first  # positions before only give context
        return Part(chunk.job, chunk, (chunk.job.id, w.index), ids[first: w.begin + chunk.end], min(scored_from, chunk.end - chunk.start))

    def _fit(self, parts: list[Part]) -> tuple[list[Part], list[PrefillChunk | ScoreChunk]]:
        """Decode tokens always; chunks in order while the cache's free blocks hold their worst case
        (a growable cache grows instead)."""
        needs = self.cache.blocks_needed([(self.rows.get(p.key), len(p.tokens)) for p in parts])
        if self.cache.growable:
            self.cache.reserve(sum(needs))
            return parts, []
        free = self.cache.free_blocks
        kept: list[Part] = []
        deferred: list[PrefillChunk | ScoreChunk] = []
        for part, need in zip(parts, needs):
            if part.chunk is not None and need > free:
                deferred.append(part.chunk)
                continue
            free -= need
            kept.append(part)
        return kept, deferred

    def _forward_isolated(self, parts: list[Part], failed: list[tuple[Job, str]]) -> StepOutput | None:
        """The step's forward; if it raises, each part alone on a restored cache, then the rest again."""
        if not parts:
            return None
        for part in parts:
            if part.key not in self.rows:
                self.rows[part.key] = self.cache.allocate()
            part.row = self.rows[part.key]
        snap = self.cache.snapshot([p.row for p in parts])
        try:
            return self._forward(parts)
        except Exception as exc:
            self.cache.restore(snap)
            batch_error = exc
            if len(parts) == 1:
                (part,) = parts
                # no traceback at the default level: logs carry no request content (RELIABILITY.md)
                log.warning("forward failed for request %s: %s", part.job.id, type(exc).__name__)
                log.debug("traceback", exc_info=True)
                what = "scoring failed" if part.stage == "score" else "decoding failed" if part.chunk is None else "prefill failed"
                failed.append((part.job, f"{what}: {type(exc).__name__}: {exc}"))
                part.output = None
                return None
        bad = []
        for part in parts:
            solo_failed: list[tuple[Job, str]] = []
            self._forward_isolated([part], solo_failed)
            self.cache.restore(snap)
            if solo_failed:
                bad.append(part)
                failed += solo_failed
        if not bad:
            log.error("a batched forward failed (%s) but no request fails alone", type(batch_error).__name__)
            log.debug("batched forward error: %s", batch_error)
            raise RuntimeError("batched forward failed with no culprit") from batch_error
        rest = [p for p in parts if p not in bad]
        for part in rest:
            part.output = None
        return self._forward_isolated(rest, failed)

    def _forward(self, parts: list[Part]) -> StepOutput:
        for part in parts:
            ids = part.job.seqs[part.chunk.window.seq] if isinstance(part.chunk, ScoreChunk) else part.job.prompt_ids  # type: ignore[union-attr]
            self.faults.check(part.stage, ids)
        wanted: list[int] = []
        start = 0
        for part in parts:
            part.span = slice(start, start + len(part.tokens))
            wanted += range(start + part.logits_from, start + len(part.tokens))
            start += len(part.tokens)
        batch = TokenBatch.build(self.cache, [(p.row, p.tokens) for p in parts], wanted, self.device)
        batch.fitted = True  # `_fit` made room for the worst case
        threads = 1 if len(batch) < self.serial_below else self.threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        out = self.model.forward_step(batch, self.cache)
        at = 0
        for part in parts:
            n = len(part.tokens) - part.logits_from
            part.logits, part.output = out.logits[at: at + n], out
            at += n
        return out

    def _account(self, parts: list[Part], step: StepOutput, result: RunnerOutput) -> None:
        """Each request's routing counts and attended pairs (priced when it ends), the step's per-phase
        counts and its FLOPs (pricing is linear, so the step prices from its sums)."""
        sizes = [len(p.tokens) for p in parts]
        index = torch.arange(len(parts)) if len(sizes) == len(step.operator) else torch.repeat_interleave(
            torch.arange(len(parts)), torch.tensor(sizes))
        counts = np.asarray(step.span_counts, dtype=np.int64)  # spans are the parts, in order
        pairs = attended_pairs(step.keys_seen, index, len(parts)).numpy()
        total = RequestCost()
        decode = np.zeros(counts.shape[1:], dtype=np.int64)
        for k, part in enumerate(parts):
            n = len(part.tokens)
            start, heads = self.cache.positions[part.row] - n, n - part.logits_from
            seq = part.chunk.window.seq if isinstance(part.chunk, ScoreChunk) else 0
            part.job.cost_of(seq).add(counts[k], pairs[k], n, start, heads)
            total.add(counts[k], pairs[k], n, start, heads)
            if part.chunk is None:
                decode += counts[k]
        assert total.counts is not None
        result.counts = [decode.tolist(), (total.counts - decode).tolist()]
        result.executed_flops, result.dense_flops = total.price(self.model)

    # ------------------------------------------------------------------ cache state for admission
    def kv_used_bytes(self) -> int:
        return self.cache.used_bytes()

    def kv_tokens(self) -> tuple[int, int]:
        """(cache entry bytes of the rows in use, tokens they have seen)."""
        rows = list(self.rows.values())
        if not rows:
            return 0, 0
        return self.cache.entry_bytes(rows), sum(self.cache.positions[r] for r in rows)
