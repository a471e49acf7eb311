"""The prefix cache's block bookkeeping on a real model (in process): rows that start from shared blocks
compute exactly what rows computed from scratch do, no block is ever both free and held, and once every
row is freed and every cached prefix evicted the whole pool is free again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import load_checkpoint
from model.kv_cache import BLOCK, PagedKVCache
from model.step import StepOutput, TokenBatch
from server.engine.prefix_cache import PrefixCache, Processed

BLOCKS = 160


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> torch.nn.Module:
    return load_checkpoint(tiny_checkpoint)[0].eval()


def run(model: torch.nn.Module, cache: PagedKVCache, prefix: PrefixCache | None, row: int, ids: list[int], start: int,
        n: int) -> StepOutput:
    """Feed ids[start:start + n] to `row` with logits at every position; the prefix cache records them."""
    out = model.forward_step(TokenBatch.build(cache, [(row, ids[start: start + n])]), cache)
    if prefix is not None:
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        prefix.record(Processed(row, start, ids[start: start + n], ids[start + 1: start + n + 1], out.operator.numpy(), out.entropy.numpy(),
                                None if out.gate is None else out.gate.numpy(), (out.keys_seen > 0).numpy(), lambda: logp, 0))
    return out


def check_pool(cache: PagedKVCache, prefix: PrefixCache, rows: list[int]) -> None:
    """Free blocks are distinct and held by nobody; every block in use is held by a row or a cached prefix."""
    free = cache.free_stack[: cache.free_blocks].numpy()
    assert len(set(free.tolist())) == free.size
    held = set()
    for row in rows:
        for layer, n in enumerate(cache.lengths[row].tolist()):
            held |= set(cache.tables[row, layer, : -(-n // BLOCK)].tolist())
    for node in prefix.nodes.values():
        held |= set(node.own_blocks().tolist())
    assert not held & set(free.tolist())
    assert len(held) + free.size == cache.n_blocks
    assert prefix.cached_blocks == int(np.count_nonzero(prefix.node_refs))


BASE = list(range(3, 83))
SEQUENCE = st.tuples(st.integers(0, 80), st.lists(st.integers(100, 110), min_size=1, max_size=30), st.integers(1, 40))


@settings(max_examples=25)
@given(st.lists(SEQUENCE, min_size=1, max_size=8), st.booleans())
def test_shared_rows_compute_exactly_what_fresh_rows_do_and_no_block_leaks(
    model: torch.nn.Module, sequences: list, evict_early: bool
) -> None:
    cache = PagedKVCache.for_model(model, rows=4, blocks=BLOCKS, growable=False)
    prefix = PrefixCache(model, cache)
    fresh = PagedKVCache.for_model(model, rows=2, blocks=BLOCKS, growable=False)
    live: list[int] = []
    for shared, tail, chunk in sequences:
        ids = [1, *BASE[:shared], *tail]
        row = cache.allocate()
        hit = prefix.attach(row, ids, outputs=False)
        start = hit.tokens if hit is not None else 0
        assert start % BLOCK == 0 and start < len(ids)
        pieces = []
        for at in range(start, len(ids), chunk):
            if not prefix.make_room(sum(cache.blocks_needed([(row, min(chunk, len(ids) - at))]))):
                break  # the pool is full of live rows: this one stops here (what a runner would defer)
            pieces.append(run(model, cache, prefix, row, ids, at, min(chunk, len(ids) - at)).logits)
        ref = fresh.allocate()
        want = run(model, fresh, None, ref, ids, 0, len(ids))
        fresh.free(ref)
        got = torch.cat(pieces) if pieces else want.logits[:0]
        assert torch.equal(got, want.logits[start : start + got.shape[0]])  # bit for bit
        if hit is not None:  # the cached outputs are the prefix's own
            assert np.array_equal(hit.operator, want.operator[:start].numpy())
            assert np.array_equal(hit.entropy, want.entropy[:start].double().numpy(), equal_nan=True)
        live.append(row)
        if len(live) > 2 or evict_early:
            gone = live.pop(0)
            prefix.release_row(gone)
            cache.free(gone)
        check_pool(cache, prefix, live)
    for row in live:
        prefix.release_row(row)
        cache.free(row)
    assert prefix.make_room(BLOCKS)
    assert not prefix.nodes and prefix.cached_blocks == 0
    assert cache.free_blocks == BLOCKS and not cache.shared.any()


def test_a_row_never_writes_into_a_block_it_shares(model: torch.nn.Module) -> None:
    """Copy-on-write: extending a row that starts mid-block leaves the cached prefix's blocks as they were."""
    cache = PagedKVCache.for_model(model, rows=4, blocks=BLOCKS, growable=False)
    prefix = PrefixCache(model, cache)
    ids = [1, *BASE[:43]]  # 44 tokens: 5 full blocks cached, routed layers hold partly filled blocks
    first = cache.allocate()
    prefix.attach(first, ids, outputs=False)
    run(model, cache, prefix, first, ids, 0, len(ids))
    keys, values = cache.keys.clone(), cache.values.clone()
    second = cache.allocate()
    hit = prefix.attach(second, [*ids[:40], 200, 201, 202], outputs=False)
    assert hit is not None and hit.tokens == 40
    held = {
        b for layer in cache.attention_layers for b in cache.tables[first, layer, : -(-int(cache.lengths[first, layer]) // BLOCK)].tolist()
    }
    partly_filled = [layer for layer in cache.attention_layers if cache.lengths[second, layer] % BLOCK]
    assert partly_filled  # the routed layers end mid-block at 40 tokens: their last block is copied, not shared
    run(model, cache, prefix, second, [*ids[:40], 200, 201, 202], 40, 3)
    for block in held:
        assert torch.equal(cache.keys[block], keys[block]) and torch.equal(cache.values[block], values[block])


def test_a_row_that_routed_differently_from_a_cached_block_stops_recording(model: torch.nn.Module) -> None:
    """Inexact kernels (a GPU, bfloat16) could route one token differently in two computations of the same
    block: the row then stops adding to the cache instead of chaining its blocks onto a different prefix."""
    cache = PagedKVCache.for_model(model, rows=4, blocks=BLOCKS, growable=False)
    prefix = PrefixCache(model, cache)
    ids = [1, *BASE[:23]]
    first = cache.allocate()
    prefix.attach(first, ids, outputs=False)
    run(model, cache, prefix, first, ids, 0, len(ids))
    for node in prefix.nodes.values():  # as if the first computation had routed one more token to attention
        node.lengths = node.lengths + 1
    second = cache.allocate()
    assert prefix.attach(second, ids[:1], outputs=False) is None  # a row that computes the same tokens from scratch
    run(model, cache, prefix, second, ids, 0, len(ids))
    assert second not in prefix.rows and len(prefix.nodes) == 3  # nothing added, nothing left locked by it
    for row in (first, second):
        prefix.release_row(row)
        cache.free(row)
    assert prefix.make_room(BLOCKS) and cache.free_blocks == BLOCKS
