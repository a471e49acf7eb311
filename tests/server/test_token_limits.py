"""server/token_limits.py: pieces give exactly the whole text's ids, and limits refuse before the work they bound."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from server.token_limits import WHITESPACE, LimitedEncoder, RunTooLong, TooManyTokens
from tests.support import WIKI

# Pieces of the alphabet the byte-level regex treats differently: letters, digits, punctuation, contractions,
# every kind of whitespace (also U+001C, which Python calls whitespace and the regex does not), special-token
# strings, multi-byte characters.
PARTS = ["a", "bc", "Z", "é", "漢字", "1", "23", " ", "  ", "\n", "\t", "\r\n", "\x0b", "\x85", "\xa0", "\u2028", "\u3000",
         "\x1c", "'s", "'ll", "'", " '", "!", ".,", "-", "<bos>", "<eos>", "😀", "the", " the"]
texts = st.lists(st.sampled_from(PARTS), min_size=1, max_size=40).map("".join) | st.text(min_size=1, max_size=60)


def tokenizer(checkpoint: Path, special_as_text: bool) -> Tokenizer:
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tok.encode_special_tokens = special_as_text
    return tok


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("special_as_text", [True, False])
def test_pieces_give_the_whole_texts_ids_and_offsets(tiny_checkpoint: Path, special_as_text: bool) -> None:
    tok = tokenizer(tiny_checkpoint, special_as_text)
    encoder = LimitedEncoder(tok, 1, piece_chars=2, max_run=10**9)  # a cut at nearly every whitespace
    assert encoder.splittable

    @settings(max_examples=300)
    @given(texts)
    def check(text: str) -> None:
        whole = tok.encode(text, add_special_tokens=False)
        got = encoder.encode([text], 10**9, per_text=True, offsets=True)[0]
        assert got.ids == [1, *whole.ids]
        assert got.offsets == [(0, 0), *whole.offsets]

    check()


def test_real_text_in_default_pieces(tiny_checkpoint: Path) -> None:
    tok = tokenizer(tiny_checkpoint, True)
    text = (WIKI / "test.txt").read_text(encoding="utf-8")[:200_000]
    got = LimitedEncoder(tok, 1).encode([text], 10**9, per_text=True)[0]
    assert got.ids[1:] == tok.encode(text, add_special_tokens=False).ids


def test_limit_is_exact_when_the_text_fits(tiny_checkpoint: Path) -> None:
    tok = tokenizer(tiny_checkpoint, True)
    encoder = LimitedEncoder(tok, 1, piece_chars=64)
    text = (WIKI / "valid.txt").read_text(encoding="utf-8")[:3000]
    n = len(tok.encode(text, add_special_tokens=False).ids)
    assert len(encoder.encode([text], n, per_text=True)[0].ids) == n + 1
    with pytest.raises(TooManyTokens) as refused:
        encoder.encode([text], n - 1, per_text=True)
    assert refused.value.index == 0 and refused.value.at_least > n - 1
    # the limit is per text, or for all texts together
    assert len(encoder.encode([text, text], n, per_text=True)) == 2
    with pytest.raises(TooManyTokens) as together:
        encoder.encode([text, text], 2 * n - 1, per_text=False)
    assert together.value.at_least > 2 * n - 1


def test_refused_without_tokenizing_whole(tiny_checkpoint: Path) -> None:
    """25 MB of words over a 1000-token limit: refused on the length bound; tokenizing it whole would take
    gigabytes (the issue measured 5.4 GB for 30 MB)."""
    encoder = LimitedEncoder(tokenizer(tiny_checkpoint, True), 1)
    text = "words " * 4_000_000
    before = rss_mb()
    with pytest.raises(TooManyTokens) as refused:
        encoder.encode([text], 1000, per_text=True)
    assert refused.value.at_least >= len(text) // encoder.max_token_chars  # type: ignore[operator]
    # within the length bound but with more words than the limit: refused on the word count, still before BPE
    few = "a " * 4000
    with pytest.raises(TooManyTokens) as by_words:
        encoder.encode([few], 3999, per_text=True)
    assert by_words.value.at_least == 4000
    assert rss_mb() - before < 100


def test_a_long_run_without_whitespace_is_refused(tiny_checkpoint: Path) -> None:
    encoder = LimitedEncoder(tokenizer(tiny_checkpoint, True), 1, piece_chars=100, max_run=1000)
    ok = "x" * 1000 + " tail"
    assert encoder.encode([ok], 10**6, per_text=True)[0].ids[1:] == encoder.tokenizer.encode(ok, add_special_tokens=False).ids
    with pytest.raises(RunTooLong) as refused:
        encoder.encode(["word " * 30 + "x" * 1200 + " tail"], 10**6, per_text=True)
    assert refused.value.start == 149 and refused.value.max_run == 1000  # the space before the x's
    with pytest.raises(RunTooLong):  # a run of whitespace cannot be cut either
        encoder.encode(["a" + " " * 1200 + "b"], 10**6, per_text=True)


def test_whitespace_set_is_the_pre_tokenizers() -> None:
    """WHITESPACE is exactly the byte-level regex's \\s: a character that joins neither punctuation, letters nor
    digits into one pre-token; Python's str.isspace() counts U+001C-U+001F too, and nothing else more."""
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    ours = re.compile(f"[{WHITESPACE}]")
    for c in map(chr, [*range(1, 0xD800), *range(0xE000, 0x10000)]):
        regex_space = all(len(split(f"{x}{c}{x}")) > 1 for x in "!a1")
        assert regex_space == bool(ours.fullmatch(c)), repr(c)
        # the word floor uses str.split() where U+001C-U+001F are absent: the two sets must agree elsewhere
        assert c.isspace() == (regex_space or c in "\x1c\x1d\x1e\x1f"), repr(c)


def test_other_tokenizers_are_tokenized_whole_within_the_limit() -> None:
    """A normalizer or another pre-tokenizer: no piece cutting and no length bound, but the limit still holds."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.normalizer = normalizers.Lowercase()
    encoder = LimitedEncoder(tok, 1)
    assert not encoder.splittable and encoder.max_token_chars is None
    assert encoder.encode(["a B a"], 3, per_text=True)[0].ids == [1, 1, 2, 1]
    with pytest.raises(TooManyTokens):
        encoder.encode(["a B a"], 2, per_text=True)


def test_word_floor_is_never_above_the_count(tiny_checkpoint: Path) -> None:
    """U+001C is whitespace to str.split() but punctuation to the pre-tokenizer: "!\\x1c!" is one pre-token, so
    a floor counting two words there would refuse a text within the limit."""
    tok = tokenizer(tiny_checkpoint, True)
    for text in ("!\x1c! " * 500, "a\xa0b " * 500, "x\u3000y\n" * 500):
        n = len(tok.encode(text, add_special_tokens=False).ids)
        assert len(LimitedEncoder(tok, 1, piece_chars=64).encode([text], n, per_text=True)[0].ids) == n + 1
