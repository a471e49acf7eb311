"""What each request's forwards cost: routing counts and attended pairs per request, priced when it ends.

A request pays for each of its positions once: a prefix taken from the cache is priced from its stored
routing as if computed, and a recompute after preemption is not priced again (`costed` marks how far a
sequence is priced). So a request's FLOPs are those of its tokens' routing, whatever the server had
cached or preempted; the step's own figures (`chiar_flops_total`) count everything that ran.
"""

from __future__ import annotations

import numpy as np
import torch

from model.accounting import attended_pairs, routing_counts
from model.operators import Operator
from model.step import StepOutput
from server.engine.outputs import Part, RunnerOutput, ScoreChunk
from server.engine.prefix_cache import CachedPrefix
from server.engine.requests import GenerateJob, Job, RequestCost, Window

N_OPERATORS = len(Operator)


def _holder(part: Part) -> Window | Job:
    """What carries the `costed` mark of a part's sequence: its scoring window or its generation request."""
    return part.chunk.window if isinstance(part.chunk, ScoreChunk) else part.job


def account(parts: list[Part], step: StepOutput, result: RunnerOutput, model: torch.nn.Module) -> None:
    """Each request's routing counts and attended pairs, the step's per-phase counts and its FLOPs
    (pricing is linear, so the step prices from its sums)."""
    skips = [min(len(p.tokens), max(0, _holder(p).costed - p.start)) for p in parts]  # type: ignore[union-attr]
    counts, pairs = _per_part(parts, skips, step)
    total = RequestCost(counts.sum(0), pairs.sum(0))
    decode_parts = []
    for k, (part, skip) in enumerate(zip(parts, skips)):
        n = len(part.tokens)
        total.add_tokens(n, part.start, n - part.logits_from)
        seq = part.chunk.window.seq if isinstance(part.chunk, ScoreChunk) else 0
        part.job.cost_of(seq).add(counts[k], pairs[k], n - skip, part.start + skip, n - max(part.logits_from, skip))
        holder = _holder(part)
        holder.costed = max(holder.costed, part.start + n)  # type: ignore[union-attr]
        if part.chunk is None:
            decode_parts.append(k)
    assert total.counts is not None
    decode = counts[decode_parts].sum(0)
    result.counts = [decode.tolist(), (total.counts - decode).tolist()]
    result.executed_flops, result.dense_flops = total.price(model)


def _per_part(parts: list[Part], skips: list[int], step: StepOutput) -> tuple[np.ndarray, np.ndarray]:
    """Routing counts and attended pairs of each part's positions not priced before, and of those that
    were in one more bucket (index len(parts)); the forward's per-span counts when nothing was."""
    n = len(parts)
    if not any(skips):  # the usual step: spans are the parts, in order
        sizes = [len(p.tokens) for p in parts]
        index = torch.arange(n) if len(sizes) == len(step.operator) else torch.repeat_interleave(torch.arange(n), torch.tensor(sizes))
        counts = step.span_counts
        counts = np.concatenate([counts, np.zeros_like(counts[:1])])
        return counts, attended_pairs(step.keys_seen, index, n + 1).numpy()
    index = torch.cat([torch.tensor([n] * skip + [k] * (len(p.tokens) - skip), dtype=torch.long)
                       for k, (p, skip) in enumerate(zip(parts, skips))])
    return routing_counts(step.operator, index, n + 1).numpy(), attended_pairs(step.keys_seen, index, n + 1).numpy()


def cost_cached(job: Job, window: Window | None, hit: CachedPrefix) -> None:
    """Price a cached prefix into its request as if it had been computed for it."""
    holder = window if window is not None else job
    lo, hi = holder.costed, hit.tokens  # type: ignore[union-attr]
    if hi <= lo:
        return
    attended = hit.operator == int(Operator.ATTENTION)  # [tokens, L]
    seen = np.cumsum(attended, axis=0) * attended  # an attending token sees the entries up to its own
    counts = np.stack([np.bincount(hit.operator[lo:hi, layer], minlength=N_OPERATORS) for layer in range(hit.operator.shape[1])])
    if window is not None:
        heads = max(0, hi - max(lo, window.score_from - 1 - window.begin))  # positions whose logits scoring computes
    else:
        assert isinstance(job, GenerateJob)
        heads = hi - lo if job.params.prompt_logprobs is not None else 0
    job.cost_of(window.seq if window is not None else 0).add(counts, seen[lo:hi].sum(0).astype(np.float64), hi - lo, lo, heads)
    holder.costed = hi  # type: ignore[union-attr]
