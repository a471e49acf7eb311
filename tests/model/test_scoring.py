"""model/scoring.py: the window planner (property tests), right padding and the perplexity metrics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.scoring import Perplexity, plan_windows, right_pad, total_nll


@settings(max_examples=200)
@given(n_ids=st.integers(1, 400), window=st.integers(1, 48), data=st.data())
def test_windows_score_every_target_once_within_the_context(n_ids: int, window: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, window), label="stride")
    spans = plan_windows(n_ids, window, stride)
    scored: list[int] = []
    for k, s in enumerate(spans):
        assert 0 <= s.begin < s.end <= n_ids - 1  # inputs exist; ids[-1] is only a target
        assert s.length <= window
        assert s.begin + 1 <= s.score_from <= s.end  # scores at least one target, never one before its inputs
        if k:
            assert s.begin == spans[k - 1].begin + stride  # windows start `stride` apart
        scored.extend(range(s.score_from, s.end + 1))  # targets ids[score_from : end + 1]
    assert scored == list(range(1, n_ids))  # every target exactly once, in order


@given(n_ids=st.integers(2, 200), window=st.integers(1, 32))
def test_each_target_gets_the_longest_context_its_window_gives(n_ids: int, window: int) -> None:
    """With stride 1 every target after the first window sees a full window of context."""
    for s in plan_windows(n_ids, window, 1)[1:]:
        assert s.score_from == s.end and s.length == window


def test_planner_rejects_bad_window_and_stride() -> None:
    with pytest.raises(ValueError, match="window"):
        plan_windows(10, 0, 1)
    with pytest.raises(ValueError, match="stride"):
        plan_windows(10, 4, 5)
    assert plan_windows(1, 4, 2) == []  # BOS alone: nothing to score


def test_right_pad_aligns_left_and_masks() -> None:
    ids, mask = right_pad([[5, 6, 7], [8]], pad=9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_perplexity_metrics() -> None:
    p = Perplexity.of_text("two words é", nll=12.0, tokens=4)
    assert (p.words, p.bytes) == (3, 12)
    assert math.isclose(p.token_ppl, math.exp(3.0)) and math.isclose(p.word_ppl, math.exp(4.0))
    assert math.isclose(p.bits_per_byte, 12.0 / (12 * math.log(2)))
    assert Perplexity(1e6, 1, 0, 0).token_ppl is None  # overflow
    assert Perplexity(1.0, 1, 0, 0).word_ppl is None and Perplexity(1.0, 1, 0, 0).bits_per_byte is None
    assert total_nll([-0.1] * 10) == 1.0  # exact summation
