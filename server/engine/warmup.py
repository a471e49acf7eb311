"""The engine's warm-up: a prompt, a chunk and decode steps through the real cache, before the first request.

Their timings seed the scheduler's cost model, and the cache the prompt leaves gives admission its first
estimate of the attending share.
"""

from __future__ import annotations

import time

import torch

from model.kv_cache import PagedKVCache
from model.step import TokenBatch
from server.engine.cost_model import StepStats
from server.engine.scheduler import Scheduler


def warm_up(model: torch.nn.Module, cache: PagedKVCache, scheduler: Scheduler, device: torch.device) -> None:
    """Two rounds of a long prompt, a short chunk and three decode steps of two rows; the second round's
    timings count (the first pays for first-call costs). The rows are freed afterwards."""
    config = model.config
    n = min(64, config.max_seq_len - 8)
    while n > 4 and sum(cache.blocks_needed([(None, n + 3), (None, 7)])) > cache.n_blocks:  # a small pool: a shorter prompt
        n -= 1
    ids = [(3 + i) % (config.vocab_size - 1) for i in range(n)]
    rows = [cache.allocate() for _ in range(2)]
    for _ in range(2):
        for row in rows:
            cache.free(row)
        rows = [cache.allocate() for _ in range(2)]
        t0 = time.perf_counter()
        model.forward_step(TokenBatch.build(cache, [(rows[0], ids)], [n - 1], device), cache)
        long = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.forward_step(TokenBatch.build(cache, [(rows[1], ids[:4])], [3], device), cache)
        short = time.perf_counter() - t0
        t0 = time.perf_counter()
        for token in range(3):
            model.forward_step(TokenBatch.build(cache, [(row, [token]) for row in rows], None, device), cache)
        decode = (time.perf_counter() - t0) / 3
    scheduler.cost.observe(StepStats(0, n, long))
    scheduler.cost.observe(StepStats(0, 4, short))
    scheduler.cost.observe(StepStats(2, 0, decode))
    # first estimate of the attending share (admission's estimate until steps measure it)
    seen = float(n + 3) * scheduler.limits.kv_bytes_per_token
    scheduler.kv_share = min(1.0, max(0.05, cache.entry_bytes([rows[0]]) / seen))
    for row in rows:
        cache.free(row)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
