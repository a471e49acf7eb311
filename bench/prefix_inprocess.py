"""`make bench-prefix`, its in-process part: a row started from a cached prefix by sharing its blocks vs
copying them, and what recording cached blocks costs beside the forward (bench/prefix.py reports both).

Both run on the server's default thread count (the cores minus one, at least one: `Settings.forward_threads`):
with two threads on this 2-core box, a forward stalls whenever another process takes one of the cores, and a
5-token forward then measured 3 ms or 300 ms from one call to the next.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path


def server_threads() -> int:
    """The forward's threads as the server sets them by default."""
    import torch

    threads = max(1, len(os.sched_getaffinity(0)) - 1)
    torch.set_num_threads(threads)
    return threads


@dataclass
class Design:
    mode: str
    attach_ms: float
    kib_per_row: float
    step_ms: float  # the row's first forward after attaching (the rest of its prompt)


def processed(row: int, start: int, ids: list[int], step: object, logp: object = None, logits_from: int | None = None) -> object:
    from server.engine.prefix_cache import Processed

    n = len(step.operator)  # type: ignore[attr-defined]
    return Processed(row, start, ids[start: start + n], ids[start + 1: start + n + 1], step.operator.numpy(),  # type: ignore[attr-defined]
                     step.entropy.numpy(),  # type: ignore[attr-defined]
                     None if step.gate is None else step.gate.numpy(), (step.keys_seen > 0).numpy(),  # type: ignore[attr-defined]
                     logp, n if logits_from is None else logits_from)  # type: ignore[arg-type]


def designs(checkpoint: Path, tokens: int, rows: int = 8) -> list[Design]:
    """A cached prefix of `tokens` tokens; `rows` rows start from it by sharing its blocks or by copying them,
    the two designs interleaved so machine load hits both alike."""

    from model import load_checkpoint
    from model.kv_cache import PagedKVCache
    from model.step import TokenBatch
    from server.engine.prefix_cache import PrefixCache

    model = load_checkpoint(checkpoint)[0].eval()
    ids = [1, *range(10, 10 + tokens - 1)]
    caches = {}
    for mode in ("share", "copy"):
        cache = PagedKVCache.for_model(model, rows=rows + 2, tokens_per_row=tokens + 64, growable=False)
        prefix = PrefixCache(model, cache, copy=mode == "copy")
        first = cache.allocate()
        prefix.attach(first, ids, outputs=False)
        prefix.record(processed(first, 0, ids, model.forward_step(TokenBatch.build(cache, [(first, ids)], [len(ids) - 1]), cache)))
        caches[mode] = (cache, prefix)
    times: dict[str, tuple[list[float], list[float], list[float]]] = {mode: ([], [], []) for mode in caches}
    for k in range(rows):
        for mode, (cache, prefix) in caches.items():
            prompt = [*ids, 7 + k]  # one more token: the row starts from every full block and computes the rest
            row, free = cache.allocate(), cache.free_blocks
            t0 = time.perf_counter()
            hit = prefix.attach(row, prompt, outputs=False)
            times[mode][0].append(time.perf_counter() - t0)
            times[mode][1].append((free - cache.free_blocks) * cache.block_bytes)
            assert hit is not None
            t0 = time.perf_counter()
            model.forward_step(TokenBatch.build(cache, [(row, prompt[hit.tokens:])], [0]), cache)
            times[mode][2].append(time.perf_counter() - t0)
    return [
        Design(mode, 1000 * statistics.median(a), statistics.mean(b) / 1024, 1000 * statistics.median(c))
        for mode, (a, b, c) in times.items()
    ]


def bookkeeping(checkpoint: Path, tokens: int, rows: int = 16, steps: int = 32) -> dict[str, float]:
    """What recording costs beside the forward: a `tokens`-token prefill (without and with the logits' log-
    probabilities, as scoring keeps them), and a decode step of `rows` sequences (ms, medians)."""
    import torch

    from model import load_checkpoint
    from model.kv_cache import PagedKVCache
    from model.step import TokenBatch
    from server.engine.prefix_cache import PrefixCache

    model = load_checkpoint(checkpoint)[0].eval()
    cache = PagedKVCache.for_model(model, rows=rows + 4, tokens_per_row=tokens + steps + 16, growable=False)
    prefix = PrefixCache(model, cache)
    out: dict[str, list[float]] = {
        k: [] for k in ("prefill forward", "prefill record", "prefill record with logprobs", "decode forward", "decode record")
    }
    for k in range(3):
        ids = [1, *range(10 + k, 10 + k + tokens - 1)]
        for key, logits in (("prefill record", False), ("prefill record with logprobs", True)):
            row = cache.allocate()
            prefix.attach(row, [99 - k, *ids] if logits else ids, outputs=False)  # distinct prompts: nothing cached
            seq = [99 - k, *ids] if logits else ids
            t0 = time.perf_counter()
            step = model.forward_step(TokenBatch.build(cache, [(row, seq)], None if logits else [len(seq) - 1]), cache)
            out["prefill forward"].append(time.perf_counter() - t0)
            logp = torch.log_softmax(step.logits.float(), dim=-1) if logits else None
            t0 = time.perf_counter()
            prefix.record(processed(row, 0, seq, step, (lambda lp=logp: lp) if logits else None, 0 if logits else None))
            out[key].append(time.perf_counter() - t0)
            prefix.release_row(row)
            cache.free(row)
    live = [cache.allocate() for _ in range(rows)]
    seqs = [[1, 200 + r, *range(10, 40)] for r in range(rows)]
    for row, seq in zip(live, seqs):
        prefix.attach(row, seq, outputs=False)
        prefix.record(processed(row, 0, seq, model.forward_step(TokenBatch.build(cache, [(row, seq)], [len(seq) - 1]), cache)))
    for _ in range(steps):
        starts = [cache.positions[row] for row in live]
        t0 = time.perf_counter()
        step = model.forward_step(TokenBatch.build(cache, [(row, [5]) for row in live]), cache)
        out["decode forward"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for k, (row, seq) in enumerate(zip(live, seqs)):
            seq.append(5)
            one = replace(
                step,
                logits=step.logits[k : k + 1],
                operator=step.operator[k : k + 1],
                entropy=step.entropy[k : k + 1],
                gate=None if step.gate is None else step.gate[k : k + 1],
                keys_seen=step.keys_seen[k : k + 1],
            )
            prefix.record(processed(row, starts[k], seq, one))
        out["decode record"].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in out.items()}
