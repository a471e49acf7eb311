"""The model runner: builds batches, calls the model, keeps the running batch's KV cache, measures time.

Row b of the running `DecodeState` is `self.rows[b]`. Admissions append rows and finished requests
are removed in place (DecodeState.add / remove), so no step copies the whole running cache.
A batched call that raises is retried per request to find the culprit; only the culprit fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from model import DecodeState, ModelOutput
from server.engine.requests import GenerateJob, Job
from server.engine.scheduler import PrefillChunk, ScoreChunk

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


@dataclass
class DecodeOutput:
    jobs: list[GenerateJob]  # in row order
    logits: Tensor  # [B, V]
    out: ModelOutput


@dataclass
class ChunkOutput:
    """One prefill or scoring chunk: logits for its positions (all, or only the last) and routing."""

    chunk: PrefillChunk | ScoreChunk
    logits: Tensor  # [n, V] (all positions) or [1, V] (last only)
    operator: Tensor  # [n, L]
    entropy: Tensor  # [n, L]
    gate: Tensor  # [n]
    flops_executed: float
    flops_dense: float
    state: DecodeState | None = None  # prefill: the cache to join the running batch with
    row: int = 0  # the chunk's row in `state`


@dataclass
class RunnerOutput:
    decode: DecodeOutput | None
    chunks: list[ChunkOutput]
    failed: list[tuple[Job, str]]
    decode_seconds: float
    chunk_seconds: float


Recorder = Callable[[str, float, int, ModelOutput, Tensor | None], None]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pad: int, faults: FaultInjector, record: Recorder) -> None:
        self.model = model
        self.pad = pad
        self.faults = faults
        self.record = record
        self.device = next(model.parameters()).device
        self.state: DecodeState | None = None
        self.rows: list[GenerateJob] = []

    # ------------------------------------------------------------------ timing
    def _timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return result, start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0

    # ------------------------------------------------------------------ running batch
    def remove(self, jobs: list[GenerateJob]) -> None:
        gone = {id(j) for j in jobs}
        drop = [r for r, job in enumerate(self.rows) if id(job) in gone]
        if not drop or self.state is None:
            return
        order = self.state.remove(drop)
        self.rows = [self.rows[i] for i in order]
        if not self.rows:
            self.state = None

    def admit(self, outputs: list[ChunkOutput]) -> None:
        """Join prefilled requests (their last chunk's cache rows) to the running batch."""
        by_state: dict[int, tuple[DecodeState, list[ChunkOutput]]] = {}
        for o in outputs:
            assert o.state is not None
            by_state.setdefault(id(o.state), (o.state, []))[1].append(o)
        for state, outs in by_state.values():
            rows = [o.row for o in outs]
            part = state if rows == list(range(len(state))) else state.select(rows)
            if self.state is None:
                self.state = part
            else:
                self.state.add(part)
            self.rows.extend(o.chunk.job for o in outs)  # type: ignore[misc]

    def kv_bytes(self, partial: Sequence[DecodeState] = ()) -> tuple[int, int]:
        """(K/V bytes the running batch and the `partial` prefill caches hold, tokens they have seen)."""
        states = [s for s in (self.state, *partial) if s is not None]
        return (int(sum(int(s.kv_cache_bytes().sum()) for s in states)), int(sum(int(s.lengths.sum()) for s in states)))

    # ------------------------------------------------------------------ step
    def run(self, decode: bool, prefill: list[PrefillChunk], score: list[ScoreChunk]) -> RunnerOutput:
        failed: list[tuple[Job, str]] = []
        decode_out, decode_seconds = None, 0.0
        if decode and self.rows:
            decode_out, decode_seconds = self._decode(failed)
        t0 = time.perf_counter()
        chunks = self._prefill(prefill, failed) + self._score(score, failed)
        return RunnerOutput(decode_out, chunks, failed, decode_seconds, time.perf_counter() - t0)

    def _decode(self, failed: list[tuple[Job, str]]) -> tuple[DecodeOutput | None, float]:
        state = self.state
        assert state is not None
        snap = state.snapshot()
        try:
            tokens = torch.tensor([job.tokens[-1] for job in self.rows], dtype=torch.long, device=self.device)
            for job in self.rows:
                self.faults.check("model", job.prompt_ids)
            out, seconds = self._timed(lambda: self.model.decode_step(tokens, state))
        except Exception as exc:  # find the culprits on copies, drop them, run the rest again
            state.restore(snap)
            bad = []
            for row, job in enumerate(self.rows):
                try:
                    self.faults.check("model", job.prompt_ids)
                    self.model.decode_step(torch.tensor([job.tokens[-1]], device=self.device), state.select([row]))
                except Exception as solo:
                    bad.append(job)
                    failed.append((job, f"decoding failed: {type(solo).__name__}: {solo}"))
            if not bad:
                log.error("batched decode failed but no request fails alone: %s: %s", type(exc).__name__, exc)
                log.debug("traceback", exc_info=True)
                raise exc
            self.remove(bad)
            if not self.rows:
                return None, 0.0
            return self._decode(failed)
        self.record("decode", seconds, len(self.rows), out, out.routing.gate[:, 0] if out.routing.gate is not None else None)
        return DecodeOutput(list(self.rows), out.logits[:, 0], out), seconds

    # ------------------------------------------------------------------ chunks
    def _isolated(self, items: list[Any], batched: Callable[[list[Any]], list[ChunkOutput]],
                  failed: list[tuple[Job, str]], what: str) -> list[ChunkOutput]:
        """Run items together; if that raises, one by one, failing only those that fail alone."""
        if not items:
            return []
        try:
            return batched(items)
        except Exception as exc:
            if len(items) == 1:
                item = items[0]
                # no traceback at the default level: logs carry no request content (RELIABILITY.md)
                log.warning("%s failed for request %s: %s", what, item.job.id, type(exc).__name__)
                log.debug("traceback", exc_info=True)
                failed.append((item.job, f"{what} failed"))
                return []
        outputs: list[ChunkOutput] = []
        for item in items:
            outputs += self._isolated([item], batched, failed, what)
        return outputs

    def _prefill(self, chunks: list[PrefillChunk], failed: list[tuple[Job, str]]) -> list[ChunkOutput]:
        whole = [c for c in chunks if c.whole]
        partial = [c for c in chunks if not c.whole]
        outputs = self._isolated(whole, self._prefill_batch, failed, "prefill")
        for chunk in partial:
            outputs += self._isolated([chunk], self._prefill_partial, failed, "prefill")
        return outputs

    def _batch(self, seqs: list[list[int]]) -> tuple[Tensor, Tensor, list[int]]:
        lens = [len(s) for s in seqs]
        ids = torch.full((len(seqs), max(lens)), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), max(lens)), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : lens[b]] = torch.tensor(s)
            mask[b, : lens[b]] = 1
        return ids.to(self.device), mask.to(self.device), lens

    def _prefill_batch(self, chunks: list[PrefillChunk]) -> list[ChunkOutput]:
        for c in chunks:
            self.faults.check("model", c.job.prompt_ids)
        ids, mask, lens = self._batch([c.job.prompt_ids for c in chunks])
        all_logits = any(c.job.params.prompt_logprobs is not None for c in chunks)
        (out, state), seconds = self._timed(lambda: self.model.prefill(ids, mask, all_logits=all_logits))
        self.record("prefill", seconds, len(chunks), out, out.routing.gate[mask.bool()] if out.routing.gate is not None else None)
        outputs = []
        for b, c in enumerate(chunks):
            n = lens[b]
            logits = out.logits[b, :n] if all_logits else out.logits[b, :1]
            outputs.append(ChunkOutput(c, logits, out.routing.operator[b, :n], out.routing.entropy[b, :n], out.routing.gate[b, :n],
                                       out.flops.per_sequence_executed[b], out.flops.per_sequence_dense[b], state, b))
        return outputs

    def _prefill_partial(self, chunks: list[PrefillChunk]) -> list[ChunkOutput]:
        (c,) = chunks
        self.faults.check("model", c.job.prompt_ids)
        all_logits = c.job.params.prompt_logprobs is not None
        skip = not (all_logits or c.last)  # only the prompt's last position predicts a token we need
        ids = torch.tensor(c.job.prompt_ids[c.start:c.end], dtype=torch.long, device=self.device)
        if c.start == 0:
            (out, state), seconds = self._timed(lambda: self.model.prefill(ids[None], all_logits=all_logits, skip_logits=skip))
            c.job.prefill_state = state
        else:
            state = c.job.prefill_state
            out, seconds = self._timed(lambda: self.model.extend(ids, state, all_logits=all_logits, skip_logits=skip))
        self.record("prefill", seconds, 1, out, out.routing.gate[0] if out.routing.gate is not None else None)
        if c.last:
            c.job.prefill_state = None
        return [ChunkOutput(c, out.logits[0], out.routing.operator[0], out.routing.entropy[0], out.routing.gate[0],
                            out.flops.per_sequence_executed[0], out.flops.per_sequence_dense[0], state, 0)]

    def _score(self, chunks: list[ScoreChunk], failed: list[tuple[Job, str]]) -> list[ChunkOutput]:
        whole = [c for c in chunks if c.whole]
        partial = [c for c in chunks if not c.whole]
        outputs = self._isolated(whole, self._score_batch, failed, "scoring")
        for chunk in partial:
            outputs += self._isolated([chunk], self._score_partial, failed, "scoring")
        return outputs

    def _score_batch(self, chunks: list[ScoreChunk]) -> list[ChunkOutput]:
        seqs = []
        for c in chunks:
            ids = c.job.seqs[c.window.seq]
            self.faults.check("score", ids)
            seqs.append(ids[c.window.begin: c.window.end])
        ids, mask, lens = self._batch(seqs)
        out, seconds = self._timed(lambda: self.model.infer(ids, mask))
        self.record("prefill", seconds, len(chunks), out, out.routing.gate[mask.bool()] if out.routing.gate is not None else None)
        return [ChunkOutput(c, out.logits[b, : lens[b]], out.routing.operator[b, : lens[b]], out.routing.entropy[b, : lens[b]],
                            out.routing.gate[b, : lens[b]], out.flops.per_sequence_executed[b], out.flops.per_sequence_dense[b])
                for b, c in enumerate(chunks)]

    def _score_partial(self, chunks: list[ScoreChunk]) -> list[ChunkOutput]:
        (c,) = chunks
        seq = c.job.seqs[c.window.seq]
        self.faults.check("score", seq)
        lo = c.window.begin + c.start
        ids = torch.tensor(seq[lo: c.window.begin + c.end], dtype=torch.long, device=self.device)
        if c.start == 0:
            (out, state), seconds = self._timed(lambda: self.model.prefill(ids[None], all_logits=True))
            c.window.state = state
        else:
            out, seconds = self._timed(lambda: self.model.extend(ids, c.window.state, all_logits=True))
        self.record("prefill", seconds, 1, out, out.routing.gate[0] if out.routing.gate is not None else None)
        if c.last:
            c.window.state = None
        return [ChunkOutput(c, out.logits[0], out.routing.operator[0], out.routing.entropy[0], out.routing.gate[0],
                            out.flops.per_sequence_executed[0], out.flops.per_sequence_dense[0])]
