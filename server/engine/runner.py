"""The model runner: one forward per engine step, over the paged routed KV cache it owns.

A step's decode tokens, prompt chunks and scoring chunks are flat tokens of their cache rows and go
through `ChiarLM.forward_step` together (vLLM v1's one forward per step): eight new prompts cost one
forward, not eight. The runner alone knows which row each request holds (`rows`, keyed by request
id, and by (request id, window) for scoring windows); a row is taken at a request's first chunk and
given back when it ends. The pool of blocks is the KV budget and never grows: a step's decode tokens fit by construction (the
engine preempts sequences until they do, `make_room`), and its chunks take what is left, least recently
used cached prefixes evicted first, cut short or deferred (`deferred`) when even that is not enough. A
row starts from the longest cached prefix of its tokens (`attach`, the scheduler's PrefixHook) and
every block a forward completes is cached (`PrefixCache.record`). A forward that raises is rerun per
request on a restored cache to find the culprit; only the culprit fails.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from model.kv_cache import PagedKVCache
from model.step import StepOutput, TokenBatch
from server.engine.costs import account
from server.engine.outputs import Part, PrefillChunk, RunnerOutput, SchedulerOutput, ScoreChunk
from server.engine.prefix_cache import PrefixCache, Processed
from server.engine.requests import GenerateJob, Job
from server.engine.rows import RowTable

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


class ModelRunner(RowTable):
    """One forward per engine step over the rows of the cache (RowTable: which request holds which row)."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, faults: FaultInjector, prefix: PrefixCache | None = None,
                 serial_below: int = 0) -> None:
        super().__init__(cache, prefix)
        self.model = model
        self.faults = faults
        self.serial_below = serial_below  # steps of fewer tokens run on one thread
        self.threads = torch.get_num_threads()
        self.device = next(model.parameters()).device

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
            account(ran, step, result, self.model)
            if self.prefix is not None:
                self._record(ran, step)
        return result

    def _decode_part(self, job: GenerateJob) -> Part:
        return Part(job, None, (job.id, -1), [job.tokens[-1]], 0)

    def _prefill_part(self, chunk: PrefillChunk) -> Part:
        job = chunk.job
        want_all = job.params.prompt_logprobs is not None and chunk.start < len(job.prompt_ids)
        n = chunk.end - chunk.start
        last = n - 1 if chunk.last and not job.resumed else n  # a recompute samples nothing
        return Part(job, chunk, (job.id, -1), job.input_ids[chunk.start:chunk.end], 0 if want_all else last)

    def _score_part(self, chunk: ScoreChunk) -> Part:
        w = chunk.window
        ids = chunk.job.seqs[w.seq]
        first = w.begin + chunk.start  # input position of the chunk's first token
        scored_from = max(w.score_from - 1, first) - first  # positions before only give context
        return Part(chunk.job, chunk, (chunk.job.id, w.index), ids[first: w.begin + chunk.end], min(scored_from, chunk.end - chunk.start))

    def _fit(self, parts: list[Part]) -> tuple[list[Part], list[PrefillChunk | ScoreChunk]]:
        """Decode tokens always (the engine made room for them); chunks in order within the blocks left at
        worst case, evicting cached prefixes for them, cut to what fits or else deferred (a growable cache
        grows instead)."""
        needs = self.cache.blocks_needed([(self.rows.get(p.key), len(p.tokens)) for p in parts])
        if self.cache.growable:
            self.cache.reserve(sum(needs))
            return parts, []
        kept: list[Part] = []
        deferred: list[PrefillChunk | ScoreChunk] = []
        taken = sum(need for part, need in zip(parts, needs) if part.chunk is None)
        self.make_room(taken)
        for part, need in zip(parts, needs):
            if part.chunk is not None and not self.make_room(taken + need):
                cut = self._cut(part, self.cache.free_blocks - taken)
                if cut is None:
                    deferred.append(part.chunk)
                    continue
                part, need = cut, self.cache.blocks_needed([(self.rows.get(cut.key), len(cut.tokens))])[0]
            taken += need
            kept.append(part)
        return kept, deferred

    def _cut(self, part: Part, blocks: int) -> Part | None:
        """The part's chunk shortened to what `blocks` blocks hold at worst (None: not even one token)."""
        chunk = part.chunk
        assert chunk is not None
        n = self.cache.most_tokens(self.rows.get(part.key), max(blocks, 0), chunk.end - chunk.start - 1)
        if n == 0:
            return None
        chunk.end = chunk.start + n
        return self._prefill_part(chunk) if isinstance(chunk, PrefillChunk) else self._score_part(chunk)

    def _forward_isolated(self, parts: list[Part], failed: list[tuple[Job, str]]) -> StepOutput | None:
        """The step's forward; if it raises, each part alone on a restored cache, then the rest again."""
        if not parts:
            return None
        for part in parts:
            if part.key not in self.rows:
                self.rows[part.key] = self.cache.allocate()
            part.row = self.rows[part.key]
            part.start = self.cache.positions[part.row]
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

    def _record(self, parts: list[Part], step: StepOutput) -> None:
        """Hand every row's tokens of this forward to the prefix cache, which caches the blocks they complete."""
        assert self.prefix is not None
        operator, entropy = step.operator.cpu().numpy(), step.entropy.double().cpu().numpy()  # numpy has no bfloat16
        gate = None if step.gate is None else step.gate.double().cpu().numpy()
        attended = (step.keys_seen > 0).cpu().numpy()
        for part in parts:
            lo, hi = part.start + 1, part.start + 1 + len(part.tokens)  # positions of the tokens' targets
            if isinstance(part.chunk, ScoreChunk):  # a window's inputs: its last input's target is not among them
                w = part.chunk.window
                following = part.job.seqs[w.seq][w.begin + lo: w.begin + min(hi, w.end - w.begin)]  # type: ignore[attr-defined]
            else:  # prompt, then generated tokens (a decode token's target is not known yet: none)
                prompt, generated = part.job.prompt_ids, part.job.tokens  # type: ignore[attr-defined]
                following = prompt[lo:hi] + generated[max(0, lo - len(prompt)): max(0, hi - len(prompt))]
            logp = part.log_probs if part.logits is not None and part.logits.shape[0] else None
            self.prefix.record(Processed(part.row, part.start, part.tokens, following, operator[part.span], entropy[part.span],
                                         None if gate is None else gate[part.span], attended[part.span], logp, part.logits_from),
                               complete=part.chunk is not None)

    # ------------------------------------------------------------------ cache state for admission
    def kv_used_bytes(self) -> int:
        """Bytes of the pool in use: sequences and cached prefixes (what chiar_kv_cache_bytes{used} shows)."""
        return self.cache.used_bytes()

    def kv_held_bytes(self) -> int:
        """Bytes the sequences hold: the pool in use less what only cached prefixes hold (admission's count)."""
        evictable = self.prefix.evictable_blocks() if self.prefix is not None else 0
        return self.cache.used_bytes() - evictable * self.cache.block_bytes

    def kv_tokens(self) -> tuple[int, int]:
        """(cache entry bytes of the rows in use, tokens they have seen)."""
        rows = list(self.rows.values())
        if not rows:
            return 0, 0
        return self.cache.entry_bytes(rows), sum(self.cache.positions[r] for r in rows)
