"""ListOps generator: determinism, knobs, and answers checked by an independent evaluator."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.listops import generate_example, generate_listops


def evaluate(expression: str) -> tuple[int, int]:
    """Independent stack evaluator: (value, nesting depth) of a spaced ListOps expression."""
    stack: list[tuple[str, list[int], int]] = []
    result: tuple[int, int] | None = None
    for symbol in expression.split():
        if symbol.startswith("["):
            stack.append((symbol[1:], [], 0))
        elif symbol == "]":
            op, values, depth = stack.pop()
            ordered = sorted(values)
            n = len(ordered)
            value = {
                "MAX": ordered[-1],
                "MIN": ordered[0],
                "MED": ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) // 2,
                "SM": sum(values) % 10,
            }[op]
            if stack:
                parent_op, parent_values, parent_depth = stack.pop()
                stack.append((parent_op, [*parent_values, value], max(parent_depth, depth + 1)))
            else:
                result = (value, depth + 1)
        else:
            assert symbol.isdigit() and len(symbol) == 1
            stack[-1][1].append(int(symbol))
    assert result is not None and not stack
    return result


def test_known_examples() -> None:
    assert evaluate("[MAX 2 9 [MIN 4 7 ] 0 ]") == (9, 2)
    assert evaluate("[MED 1 8 ]") == (4, 1)  # int(median) of an even count
    assert evaluate("[SM 9 9 [MED 3 1 2 ] ]") == (0, 2)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31), index=st.integers(0, 10_000), max_depth=st.integers(1, 6),
    max_args=st.integers(2, 6), leaf_prob=st.floats(0.0, 0.9),
)
def test_answers_depth_and_length_are_right(seed: int, index: int, max_depth: int, max_args: int, leaf_prob: float) -> None:
    ex = generate_example(seed, index, max_depth=max_depth, max_args=max_args, max_length=10_000, leaf_prob=leaf_prob)
    value, depth = evaluate(ex.expression)
    assert ex.answer == value and 0 <= value <= 9
    assert ex.depth == depth <= max_depth
    assert ex.length == len(ex.expression.split())
    assert ex.text == f"{ex.expression} = {ex.answer}"
    assert ex == generate_example(seed, index, max_depth=max_depth, max_args=max_args, max_length=10_000, leaf_prob=leaf_prob)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000), lo=st.integers(1, 30), span=st.integers(10, 300), depth=st.integers(2, 8))
def test_length_knob_is_respected(seed: int, lo: int, span: int, depth: int) -> None:
    hi = lo + span
    for ex in generate_listops(10, seed=seed, max_depth=depth, min_length=lo, max_length=hi, leaf_prob=0.3):
        assert lo <= ex.length <= hi


def test_impossible_length_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="min_length"):
        generate_example(0, 0, max_depth=1, max_args=2, min_length=50, max_length=60)
    with pytest.raises(ValueError, match="max_length"):
        generate_example(0, 0, max_length=3)


def test_seeded_sets_are_deterministic_and_prefix_stable() -> None:
    a = generate_listops(50, seed=7, max_depth=4)
    assert a == generate_listops(50, seed=7, max_depth=4)
    assert a[:20] == generate_listops(20, seed=7, max_depth=4)
    assert a != generate_listops(50, seed=8, max_depth=4)
    assert len({e.expression for e in a}) > 40
    # deeper knob gives deeper trees on average
    shallow = generate_listops(200, seed=1, max_depth=2, leaf_prob=0.2)
    deep = generate_listops(200, seed=1, max_depth=6, leaf_prob=0.2)
    assert max(e.depth for e in shallow) == 2 and max(e.depth for e in deep) >= 5
    assert sum(e.length for e in deep) > sum(e.length for e in shallow)
