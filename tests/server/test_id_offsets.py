"""Echo offsets of token-id prompts: taken from recent prompts where they start alike, the same numbers as a
decode per prefix (server/id_offsets.py)."""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer

from server.id_offsets import IdOffsets


def test_offsets_from_recent_prompts_equal_a_decode_per_prefix(tiny_checkpoint: Path) -> None:
    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    calls: list[int] = []
    offsets = IdOffsets(lambda ids: calls.append(len(ids)) or decode(ids), recent=3)
    rng = random.Random(0)
    # multi-byte characters split across byte-level tokens, special tokens, random ids: prefixes then differ in the text too
    context = tok.encode("Le café à Zürich — 東京 <eos> the river and the city", add_special_tokens=False).ids
    prompts = [context + tok.encode(choice, add_special_tokens=False).ids for choice in (" ünder", " über", " 東", " 京都")]
    prompts += [context[:k] + [rng.randrange(tok.get_vocab_size()) for _ in range(6)] for k in (0, 3, len(context) - 1)]
    prompts += [context, context[:5], prompts[0]]
    for ids in prompts:
        calls.clear()
        assert offsets.offsets(ids) == [len(decode(ids[:k])) for k in range(len(ids))]
    calls.clear()
    offsets.offsets(prompts[0])  # remembered: nothing decoded again
    assert calls == []
    offsets.offsets([*context, 5, 6])  # only the offsets past the shared context are decoded
    assert calls == [len(context) + 1]  # offsets[len(context)] too: prompts[0] continues the context
