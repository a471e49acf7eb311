"""Long prompts for the long-context benchmarks: spans of WikiText-2 test of an exact token count.

The count is in the served checkpoint's own tokenizer, as the server encodes (no special tokens;
the server adds BOS), so a prompt of n tokens plus m new ones fills n + 1 + m positions.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TEST_TEXT = REPO / "data" / "wikitext-2" / "test.txt"


def context_of(checkpoint: Path) -> int:
    """The checkpoint's context (max_seq_len)."""
    return int(json.loads((checkpoint / "config.json").read_text())["max_seq_len"])


def long_texts(checkpoint: Path, n_tokens: int, count: int) -> list[str]:
    """`count` different texts of `n_tokens` tokens each (consecutive spans of WikiText-2 test; exact
    but for a rare merge at the edge that makes it one fewer)."""
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # as the server encodes

    def n_of(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    text = TEST_TEXT.read_text(encoding="utf-8")
    ids = tokenizer.encode(text[: 8 * n_tokens * (count + 1)], add_special_tokens=False).ids  # enough (<= 8 chars a token)
    if len(ids) < n_tokens * (count + 1):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) < n_tokens:
        raise ValueError(f"WikiText-2 test holds {len(ids)} tokens in this tokenizer, fewer than {n_tokens}")
    step = max(1, min(n_tokens, (len(ids) - n_tokens) // max(1, count)))
    texts = []
    for k in range(count):
        start = (k * step) % (len(ids) - n_tokens + 1)
        span = ids[start: start + n_tokens]
        text = tokenizer.decode(span)
        # decoding then encoding can merge differently at the edges: trim or pad to the exact count
        while n_of(text) > n_tokens:
            span = span[:-1]
            text = tokenizer.decode(span)
        pad = 0
        while n_of(text) < n_tokens:
            pad += 1
            text = tokenizer.decode(span) + " the" * pad
        if n_of(text) != n_tokens:  # padding overshot by a merge: drop one more token of the span and retry
            text = tokenizer.decode(span[:-1]) + " the" * pad
        texts.append(text)
    return texts
