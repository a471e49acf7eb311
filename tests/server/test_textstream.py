"""Incremental detokenization with stop strings, and printable token strings."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from server.textstream import TextStream, TokenStrings


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))


def stream_all(tokenizer: Tokenizer, ids: list[int], stop: list[str] | None = None) -> tuple[list[str], TextStream]:
    ts = TextStream(tokenizer, stop)
    deltas = []
    for i in ids:
        deltas.append(ts.push(i))
        if ts.stopped:
            break
    deltas.append(ts.finish())
    return deltas, ts


def test_textstream_reassembles_multibyte_characters(tokenizer: Tokenizer) -> None:
    text = "Café – naïve 東京 ok"
    ids = tokenizer.encode(text).ids
    deltas, ts = stream_all(tokenizer, ids)
    assert "".join(deltas) == text == ts.text
    assert all("\ufffd" not in d for d in deltas)  # never a half character


def test_textstream_stop_strings_are_held_back_and_cut(tokenizer: Tokenizer) -> None:
    text = "The end of the story. THE END and more"
    ids = tokenizer.encode(text).ids
    deltas, ts = stream_all(tokenizer, ids, stop=["THE END"])
    assert ts.stopped and "".join(deltas) == "The end of the story. " == ts.text
    deltas, ts = stream_all(tokenizer, ids, stop=["never", "story"])
    assert "".join(deltas) == "The end of the "
    deltas, ts = stream_all(tokenizer, ids, stop=["THE ENDING"])  # a prefix that never completes is released
    assert not ts.stopped and "".join(deltas) == text


def test_token_strings(tokenizer: Tokenizer) -> None:
    names = TokenStrings(tokenizer)
    assert names(2) == "<eos>"
    ids = tokenizer.encode(" the", add_special_tokens=False).ids
    assert "".join(names(i) for i in ids) == " the"
    partial = next(i for i in range(3, tokenizer.get_vocab_size()) if names(i).startswith("bytes:"))
    assert names(partial).startswith("bytes:\\x")
