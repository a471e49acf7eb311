"""Batched sampling: the native kernel and the PyTorch fallback pick exactly what a full sort defines, and rows are independent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import SamplingError, make_generator, native, sample_next, sample_tokens, sampling


def reference(row: torch.Tensor, temperature: float, k: int | None, p: float | None, u: float) -> int:
    """Top-k, then top-p over the renormalised top-k distribution, by a full sort; then the inverse CDF
    at u over the kept tokens in vocabulary order."""
    vocab = row.numel()
    scores = row / temperature
    values, order = torch.sort(scores, descending=True)
    if k is not None and k < vocab:
        values[k:] = float("-inf")
    if p is not None and p < 1.0:
        probs = values.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= p
        drop[0] = False
        values = values.masked_fill(drop, float("-inf"))
    kept = torch.full_like(scores, float("-inf")).scatter(0, order, values)
    cdf = kept.double().softmax(-1).cumsum(-1)
    return min(int(torch.searchsorted(cdf, u * cdf[-1])), vocab - 1)


@settings(max_examples=80, deadline=None)
@given(vocab=st.integers(2, 300), rows=st.integers(1, 5), seed=st.integers(0, 10**6), native=st.booleans(),
       params=st.lists(st.tuples(st.sampled_from([0.5, 1.0, 1.7]), st.one_of(st.none(), st.integers(1, 320)),
                                 st.one_of(st.none(), st.floats(0.05, 1.0))), min_size=5, max_size=5))
def test_sampling_matches_a_full_sort(vocab: int, rows: int, seed: int, native: bool, params: list) -> None:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4
    temps, ks, ps = zip(*params[:rows])
    run = sample_tokens if native else sampling._sample_tokens_torch
    tokens, bad = run(logits, list(temps), list(ks), list(ps), [make_generator(seed + r) for r in range(rows)])
    assert bad == []
    for r in range(rows):
        u = float(torch.rand(1, generator=make_generator(seed + r)))
        assert tokens[r] == reference(logits[r], temps[r], ks[r], ps[r], u)


def test_the_native_kernel_samples_the_demo_vocabulary_like_the_fallback() -> None:
    logits = torch.randn(32, 8192, generator=torch.Generator().manual_seed(2)) * 3
    temps, ks, ps = [0.0, 0.8, 1.0, 1.3] * 8, [None, None, 40, 1] * 8, [None, 0.95, 0.5, None] * 8
    native, _ = sample_tokens(logits, temps, ks, ps, [make_generator(i) for i in range(32)])
    fallback, _ = sampling._sample_tokens_torch(logits, temps, ks, ps, [make_generator(i) for i in range(32)])
    assert native == fallback


def test_a_row_does_not_depend_on_its_neighbours() -> None:
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(1))
    together, _ = sample_tokens(logits, [1.0] * 6, [None, 5, None, 40, None, None], [0.9, None, None, 0.5, 1.0, 0.3],
                                [make_generator(i) for i in range(6)])
    ks, ps = [None, 5, None, 40, None, None], [0.9, None, None, 0.5, 1.0, 0.3]
    alone = [sample_tokens(logits[i:i + 1], [1.0], [ks[i]], [ps[i]], [make_generator(i)])[0][0] for i in range(6)]
    assert together == alone


def test_rows_without_a_distribution_fail_alone() -> None:
    logits = torch.randn(3, 50)
    logits[1, 3] = float("nan")
    tokens, bad = sample_tokens(logits, [1.0, 1.0, 0.0], [None] * 3, [None] * 3, [make_generator(i) for i in range(3)])
    assert bad == [1] and tokens[1] == -1 and 0 <= tokens[0] < 50 and tokens[2] == int(logits[2].argmax())
    _, bad = sample_tokens(torch.full((1, 50), 100.0), [1e-40], [None], [None], [make_generator(0)])
    assert bad == [0]
    with pytest.raises(SamplingError):
        sample_next(logits, [1.0] * 3, [None] * 3, [None] * 3, [make_generator(i) for i in range(3)])


@pytest.mark.parametrize("vocab", [8192, 8189])
def test_the_native_samplers_scalar_path_picks_the_avx2_tokens(vocab: int) -> None:
    """The top-p histogram (vector bucketing, dump slots, member scan) has a scalar twin; both pick the same tokens."""
    lib = native.load()
    assert lib is not None
    logits = torch.randn(24, vocab, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.5, 6, 24).unsqueeze(1)
    temps, ks, ps = [0.7, 1.0, 1.4] * 8, [None, 50, None] * 8, [0.9, 0.95, 0.3] * 8
    fast, _ = sample_tokens(logits, temps, ks, ps, [make_generator(i) for i in range(24)])
    lib.set_scalar(True)
    try:
        slow, _ = sample_tokens(logits, temps, ks, ps, [make_generator(i) for i in range(24)])
    finally:
        lib.set_scalar(False)
    fallback, _ = sampling._sample_tokens_torch(logits, temps, ks, ps, [make_generator(i) for i in range(24)])
    assert fast == slow == fallback
