"""Chunked prefill (`ChiarLM.extend`) and the cache-row operations the engine uses (allocate, free, snapshot)."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.kv_cache import DecodeState
from tests.model.helpers import make_model, tiny_config

CONFIGS = [
    dict(arch="baseline"),
    dict(routing="threshold"),
    dict(routing="ste", metarouter=True),
    dict(routing="threshold", operators=("dct", "rbf", "attention")),
]


@settings(max_examples=12, deadline=None)
@given(config=st.sampled_from(CONFIGS), length=st.integers(2, 40), cuts=st.lists(st.integers(1, 39), max_size=3),
       seed=st.integers(0, 50))
def test_chunked_prefill_equals_whole_prefill(config: dict, length: int, cuts: list[int], seed: int) -> None:
    model = make_model(tiny_config(**config), seed=seed)
    # a generator seed apart from make_model's probe, so no token's entropy sits on a threshold
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed + 1000))
    whole, whole_state = model.prefill(ids, all_logits=True)
    bounds = sorted({c for c in cuts if c < length} | {length})
    first, state = model.prefill(ids[:, : bounds[0]], all_logits=True)
    logits, operators = [first.logits[0]], [first.routing.operator[0]]
    for lo, hi in itertools.pairwise(bounds):
        out = model.extend(ids[0, lo:hi], state, all_logits=True)
        logits.append(out.logits[0])
        operators.append(out.routing.operator[0])
    torch.testing.assert_close(torch.cat(logits), whole.logits[0], rtol=0, atol=1e-9)
    assert torch.equal(torch.cat(operators), whole.routing.operator[0])
    # the continued cache decodes exactly like the one-shot cache
    token = torch.tensor([3])
    a = model.decode_step(token, state)
    b = model.decode_step(token, whole_state)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-9)


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=5), drop=st.lists(st.integers(0, 8), max_size=4),
       later=st.lists(st.integers(1, 40), max_size=3), seed=st.integers(0, 50))
def test_rows_freed_and_reused_decode_as_each_sequence_alone(lengths: list[int], drop: list[int], later: list[int],
                                                             seed: int) -> None:
    """Rows freed in any order give their blocks back; sequences prefilled into the freed blocks later,
    and the survivors, decode exactly as each sequence alone."""
    model = make_model(tiny_config(routing="threshold", metarouter=True), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    prompts = [torch.randint(0, model.config.vocab_size, (1, n), generator=gen) for n in lengths + later]
    cache = model.new_cache(rows=1, tokens_per_row=8)  # grows as needed
    rows = [model.prefill(p, cache=cache)[1].rows[0] for p in prompts[: len(lengths)]]
    gone = sorted({d for d in drop if d < len(lengths)})
    for k in gone:
        cache.free(rows[k])
    keep = [k for k in range(len(lengths)) if k not in gone]
    for k in range(len(lengths), len(prompts)):
        keep.append(k)
        rows.append(model.prefill(prompts[k], cache=cache)[1].rows[0])
    if not keep:
        assert cache.free_blocks == cache.n_blocks  # every block came back
        return
    state = DecodeState(cache, [rows[k] for k in keep])
    batched = model.decode_step(torch.tensor([5] * len(keep)), state)
    for i, k in enumerate(keep):
        _, alone = model.prefill(prompts[k])
        solo = model.decode_step(torch.tensor([5]), alone)
        torch.testing.assert_close(batched.logits[i], solo.logits[0], rtol=0, atol=1e-9)
    state.release()
    assert cache.free_blocks == cache.n_blocks


def test_snapshot_restore_undoes_a_step() -> None:
    model = make_model(tiny_config(routing="threshold"), seed=1)
    _, state = model.prefill(torch.tensor([[1, 2, 3, 4] * 4, [5, 6, 7, 8] * 4]))
    cache = state.cache
    snap = cache.snapshot(state.rows)
    used = cache.n_blocks - cache.free_blocks
    first = model.decode_step(torch.tensor([9, 10]), state)  # 16 entries: the attention layers take new blocks
    assert cache.n_blocks - cache.free_blocks > used
    cache.restore(snap)
    assert cache.n_blocks - cache.free_blocks == used
    again = model.decode_step(torch.tensor([9, 10]), state)
    torch.testing.assert_close(first.logits, again.logits, rtol=0, atol=0)
    assert state.lengths.tolist() == [17, 17]
