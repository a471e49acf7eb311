"""Token limits checked before the work they bound (docs/ARCHITECTURE.md, "Request limits").

A text is never tokenized whole. `LimitedEncoder.encode` first refuses on bounds that need no
tokenization at all, then tokenizes in bounded pieces and stops at the limit:

1. length: a token covers at most `max_token_chars` characters (the longest vocabulary entry), so a
   text longer than limit x max_token_chars has more than `limit` tokens;
2. words: with the byte-level pre-tokenizer every run of non-whitespace characters is at least one
   token of its own (pre-tokens never cross whitespace), so the runs of all pieces are a lower bound;
3. pieces: the text is cut just before a whitespace character that follows a non-whitespace one.
   No pre-token spans such a point (tests/server/test_token_limits.py checks piecewise ids equal
   the whole text's), so the pieces give exactly the whole text's ids; counting stops at the limit.
   A run without such a point longer than MAX_RUN_CHARS is refused (`RunTooLong`): BPE memory grows
   with the tokens of one piece, and only bounded pieces keep it bounded.

A tokenizer for which (3) is not proven (another pre-tokenizer, a normalizer, added tokens that
contain or strip whitespace) is tokenized whole after check (1) only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

# `\s` of the pre-tokenizer's regex (Oniguruma, Unicode): \t-\r, U+0085, Zs, U+2028, U+2029. Python's
# str.isspace() also counts U+001C-U+001F, which the pre-tokenizer treats as punctuation.
WHITESPACE = "\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_CUT = re.compile(f"(?<=[^{WHITESPACE}])[{WHITESPACE}]")  # a whitespace character after a non-whitespace one
_RUN = re.compile(f"[^{WHITESPACE}]+")
_PY_ONLY_SPACE = re.compile("[\x1c-\x1f]")  # whitespace to str.split(), punctuation to the pre-tokenizer
PIECE_CHARS = 16384  # ~1.6 MB of tokenizer memory at the worst (one token per character)
MAX_RUN_CHARS = 65536  # most characters tokenized in one piece beyond PIECE_CHARS
INLINE_CHARS = 4096  # shorter batches are tokenized on the caller's thread (about a millisecond)
POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")  # bounds the tokenizer memory of all requests


class TooManyTokens(Exception):
    """Text `index` (of a batch) pushed the count past the limit; the request has at least `at_least` tokens."""

    def __init__(self, index: int, at_least: int) -> None:
        super().__init__(f"text {index}: at least {at_least} tokens")
        self.index = index
        self.at_least = at_least


class RunTooLong(Exception):
    """Text `index` has more than `max_run` characters with no whitespace after a word from character `start`."""

    def __init__(self, index: int, start: int, max_run: int) -> None:
        super().__init__(f"text {index}: over {max_run} characters without a break between words from character {start}")
        self.index = index
        self.start = start
        self.max_run = max_run


@dataclass
class Encoded:
    """BOS + the text's ids, and each id's (start, end) character offsets when asked for ((0, 0) for BOS)."""

    ids: list[int]
    offsets: list[tuple[int, int]] | None


def _splittable(spec: dict[str, Any], special_as_text: bool) -> bool:
    """True when cutting before whitespace cannot change the ids (the byte-level regex pre-tokenizer)."""
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space", False):
        return False
    for added in spec.get("added_tokens") or []:
        if added.get("special") and special_as_text:
            continue
        content = added.get("content", "")
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word") or _RUN.fullmatch(content) is None:
            return False
    return True


class LimitedEncoder:
    """A tokenizer that refuses texts over a token limit before, or while, tokenizing them in pieces."""

    def __init__(self, tokenizer: Tokenizer, bos: int, piece_chars: int = PIECE_CHARS, max_run: int = MAX_RUN_CHARS) -> None:
        self.tokenizer = tokenizer
        self.bos = bos
        self.piece_chars = piece_chars
        self.max_run = max_run
        spec = json.loads(tokenizer.to_str())
        vocab = tokenizer.get_vocab(with_added_tokens=False)
        added = [token.content for token in tokenizer.get_added_tokens_decoder().values()]
        # Most characters (bytes) of input one token covers; a normalizer may delete characters, so no bound holds
        # through one. A byte-level vocabulary spells each byte as one character.
        self.max_token_chars: int | None = None
        self.max_token_bytes: int | None = None
        if spec.get("normalizer") is None:
            self.max_token_chars = max(map(len, [*vocab, *added]), default=1)
            byte_level = (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
            self.max_token_bytes = max(max(map(len, vocab), default=1), *(len(a.encode()) for a in added)) if byte_level \
                else 4 * self.max_token_chars
        self.splittable = _splittable(spec, special_as_text=bool(tokenizer.encode_special_tokens))

    def encode(self, texts: list[str], limit: int, *, per_text: bool, offsets: bool = False) -> list[Encoded]:
        """BOS + ids of each text; raises TooManyTokens once more than `limit` ids (BOS not counted) are
        certain: in any one text (`per_text`) or in all together."""
        if self.max_token_chars is not None:
            for i, text in enumerate(texts):
                total = len(text) if per_text else sum(map(len, texts[: i + 1]))
                if total > limit * self.max_token_chars:
                    raise TooManyTokens(i, math.ceil(total / self.max_token_chars))
        if not self.splittable:
            return self._whole(texts, limit, per_text, offsets)
        plans = self._plan(texts, limit, per_text)
        out: list[Encoded] = []
        counted = 0
        for i, (text, plan) in enumerate(zip(texts, plans)):
            counted = 0 if per_text else counted
            ahead = sum(floor for _, _, floor in plan) + (0 if per_text else sum(f for p in plans[i + 1:] for _, _, f in p))
            ids, spans = [self.bos], [(0, 0)] if offsets else None
            for start, end, floor in plan:
                encoding = self.tokenizer.encode_batch([text[start:end]], add_special_tokens=False)[0]  # releases the GIL
                ids += encoding.ids
                counted += len(encoding.ids)
                ahead -= floor
                if counted + ahead > limit:  # this piece's ids + the least the rest can add
                    raise TooManyTokens(i, counted + ahead)
                if spans is not None:
                    spans += [(a + start, b + start) for a, b in encoding.offsets]
            out.append(Encoded(ids, spans))
        return out

    def _plan(self, texts: list[str], limit: int, per_text: bool) -> list[list[tuple[int, int, int]]]:
        """(start, end, fewest tokens) of each text's pieces; refuses as soon as those floors pass `limit`."""
        plans: list[list[tuple[int, int, int]]] = []
        least = 0
        for i, text in enumerate(texts):
            least = 0 if per_text else least
            plan = []
            for start, end in self._pieces(i, text):
                floor = self._floor(text[start:end])
                plan.append((start, end, floor))
                least += floor
                if least > limit:
                    raise TooManyTokens(i, least)
            plans.append(plan)
        return plans

    def _whole(self, texts: list[str], limit: int, per_text: bool, offsets: bool) -> list[Encoded]:
        out: list[Encoded] = []
        counted = 0
        for i, encoding in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            counted = len(encoding.ids) + (0 if per_text else counted)
            if counted > limit:
                raise TooManyTokens(i, counted)
            out.append(Encoded([self.bos, *encoding.ids], [(0, 0), *encoding.offsets] if offsets else None))
        return out

    def _floor(self, piece: str) -> int:
        """Fewest tokens `piece` can have: one per run of non-whitespace, and at least its length / longest token."""
        assert self.max_token_chars is not None  # splittable tokenizers have no normalizer
        # str.split() is 2.5x faster than the regex; its whitespace is the regex's plus U+001C-U+001F
        runs = len(_RUN.findall(piece)) if _PY_ONLY_SPACE.search(piece) else len(piece.split())
        return max(runs, math.ceil(len(piece) / self.max_token_chars))

    def _pieces(self, index: int, text: str) -> Iterator[tuple[int, int]]:
        """(start, end) of pieces of about `piece_chars`, each ending just before a cut point or at the end."""
        start = 0
        while start < len(text):
            target = start + self.piece_chars
            cut = _CUT.search(text, target) if target < len(text) else None
            end = cut.start() if cut else len(text)
            if end - target > self.max_run:
                last = [m.start() for m in _CUT.finditer(text, start, target + 1)]  # where the uncut stretch begins
                raise RunTooLong(index, last[-1] if last else start, self.max_run)
            yield start, end
            start = end
