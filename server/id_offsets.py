"""Each token's character offset in a token-id prompt (echo's `text_offset`), remembered for recent prompts.

offsets[k] = len(decode(ids[:k])): one decode per prefix, O(n^2) in the ids (about 170 ms for 1,520 ids of
chiar-small's tokenizer, the same whether or not the KV prefix cache holds the prompt). offsets[k] depends
on ids[:k] alone, so a prompt that starts like a recent one (lm-eval's multiple choice: one context, several
continuations, each a request) takes their offsets up to where the two differ and decodes only the rest:
the same numbers, computed once.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

RECENT = 16  # prompts remembered per served model


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class IdOffsets:
    """offsets(ids)[k] == len(decode(ids[:k])) for every k < len(ids); thread-safe (the tokenizer pool calls it)."""

    def __init__(self, decode: Callable[[list[int]], str], recent: int = RECENT) -> None:
        self.decode = decode
        self._recent: deque[tuple[list[int], list[int]]] = deque(maxlen=recent)
        self._lock = threading.Lock()

    def offsets(self, ids: list[int]) -> list[int]:
        with self._lock:
            recent = list(self._recent)
        reuse: list[int] = []
        for prev, offsets in recent:
            # offsets[k] for k <= the common prefix are the same for both prompts
            n = min(common_prefix(prev, ids) + 1, len(offsets), len(ids))
            if n > len(reuse):
                reuse = offsets[:n]
        out = reuse + [len(self.decode(ids[:k])) for k in range(len(reuse), len(ids))]
        if len(reuse) < len(ids):
            with self._lock:
                self._recent.append((list(ids), out))
        return out
