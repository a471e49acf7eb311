"""Incremental detokenization with stop strings, and printable token strings for logprobs."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenStrings:
    """id -> text piece of one token (OpenAI logprobs style: 'bytes:\\xe2' for partial UTF-8)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}

    def __call__(self, token_id: int) -> str:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            text = f"<unk:{token_id}>"
        elif piece in self._specials:
            text = piece
        else:
            table = _byte_decoder()
            try:
                raw = bytes(table[ch] for ch in piece)
            except KeyError:  # not a byte-level piece
                text = piece
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        self._cache[token_id] = text
        return text


class TextStream:
    """Turns generated token ids into text deltas, holding back partial characters and stop-string prefixes.

    `push(id)` returns the text that is now safe to show; `stopped` turns true when a stop string
    appears (the text is cut before it); `finish()` flushes what was held back.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (stable)
        self.sent = 0  # characters handed out
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            start = len(self.text)
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            if self._check_stop(start):
                return self._take(len(self.text))
        return self._take(len(self.text) - self._held())

    def finish(self) -> str:
        """Flush the rest (partial characters included) at the end of generation."""
        if not self.stopped and self._read < len(self.ids):
            prefix_text = self._decode(self.ids[self._prefix:self._read])
            new_text = self._decode(self.ids[self._prefix:])
            start = len(self.text)
            self.text += new_text[len(prefix_text):]
            self._read = len(self.ids)
            self._check_stop(start)
        return self._take(len(self.text))

    def _check_stop(self, start: int) -> bool:
        if not self.stop:
            return False
        longest = max(len(s) for s in self.stop)
        window_start = max(0, start - longest + 1)
        hits = [i for i in (self.text.find(s, window_start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = True
        return True

    def _held(self) -> int:
        """Length of the longest text suffix that could still become a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta = self.text[self.sent:upto]
        self.sent = upto
        return delta
