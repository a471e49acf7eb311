"""Deterministic ListOps generator (Long Range Arena style): nested MAX/MIN/MED/SM over digits 0-9.

An expression is written with spaced symbols, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` (value 9).
MED is ``int(median)`` (the lower integer of the middle two for an even count, as LRA's
``int(np.median(x))``), SM is the sum modulo 10. Example ``i`` of seed ``s`` depends only on
``(s, i)``, so any prefix of a generated set is reproducible on its own.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

OPERATORS = ("MAX", "MIN", "MED", "SM")
_MAX_TRIES = 1000


@dataclass(frozen=True)
class ListOpsExample:
    expression: str  # spaced symbols
    answer: int  # value 0-9
    depth: int  # operator nesting depth (1 = flat list)
    length: int  # number of symbols

    @property
    def text(self) -> str:
        """The language-model training line: ``<expression> = <answer>``."""
        return f"{self.expression} = {self.answer}"


def apply_operator(op: str, values: list[int]) -> int:
    """The value of one ListOps operator applied to digit values."""
    if op == "MAX":
        return max(values)
    if op == "MIN":
        return min(values)
    if op == "MED":
        return int(statistics.median(values))
    if op == "SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def _tree(
    rng: random.Random, depth: int, max_depth: int, max_args: int, leaf_prob: float, budget: int
) -> tuple[list[str], int, int]:
    """Symbols, value and nesting depth of a random operator node at `depth` (root = 1), at most
    `budget` symbols long (budget >= 4: "[OP", two digits, "]")."""
    op = rng.choice(OPERATORS)
    n_args = rng.randint(2, max(2, min(max_args, budget - 2)))
    spare = budget - 2 - n_args  # symbols left beyond one per argument
    symbols, values, sub_depth = ["[" + op], [], 0
    for _ in range(n_args):
        if depth >= max_depth or spare < 3 or rng.random() < leaf_prob:
            digit = rng.randint(0, 9)
            symbols.append(str(digit))
            values.append(digit)
        else:
            sub, value, d = _tree(rng, depth + 1, max_depth, max_args, leaf_prob, spare + 1)
            spare -= len(sub) - 1
            symbols.extend(sub)
            values.append(value)
            sub_depth = max(sub_depth, d)
    symbols.append("]")
    return symbols, apply_operator(op, values), sub_depth + 1


def generate_example(
    seed: int, index: int, max_depth: int = 4, max_args: int = 5, min_length: int = 1, max_length: int = 200,
    leaf_prob: float = 0.3,
) -> ListOpsExample:
    """Example `index` of the set seeded by `seed`. Trees grow within max_length; ones shorter than
    min_length are redrawn."""
    if max_length < 4:
        raise ValueError(f"max_length: must be >= 4 (the shortest expression, e.g. [MAX 1 2 ]), got {max_length}")
    rng = random.Random(f"listops:{seed}:{index}")
    for _ in range(_MAX_TRIES):
        symbols, value, depth = _tree(rng, 1, max_depth, max_args, leaf_prob, max_length)
        if len(symbols) >= min_length:
            return ListOpsExample(" ".join(symbols), value, depth, len(symbols))
    raise ValueError(
        f"min_length: no expression of at least {min_length} symbols in {_MAX_TRIES} tries "
        f"(max_depth={max_depth}, max_args={max_args}, leaf_prob={leaf_prob}); lower min_length or leaf_prob"
    )


def generate_listops(
    num_examples: int, seed: int = 0, max_depth: int = 4, max_args: int = 5, min_length: int = 1,
    max_length: int = 200, leaf_prob: float = 0.3,
) -> list[ListOpsExample]:
    """`num_examples` deterministic examples (see module docstring)."""
    return [
        generate_example(seed, i, max_depth, max_args, min_length, max_length, leaf_prob) for i in range(num_examples)
    ]
