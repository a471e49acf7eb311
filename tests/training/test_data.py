"""Sources, token streams, mixed batches (ratios, tags, determinism, position) and sliding-window scoring."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model import ChiarConfig, ChiarLM
from model.scoring import Perplexity
from training.config import SourceConfig
from training.data import MixedBatches, cut_at_line, load_documents, load_sources, shard_batch, split_holdout
from training.errors import TrainingError
from training.evaluate import metrics, score_ids


def _streams() -> dict[str, torch.Tensor]:
    return {"a": torch.arange(0, 1001), "b": torch.arange(10_000, 10_401), "c": torch.arange(20_000, 20_201)}


def test_mixed_batches_follow_ratios_and_are_tagged() -> None:
    mb = MixedBatches(_streams(), {"a": 6.0, "b": 3.0, "c": 1.0}, seq_len=10, batch_size=4, seed=0)
    seen = {"a": 0, "b": 0, "c": 0}
    for _ in range(3000):
        batch = mb.next()
        seen[batch.source] += 1
        lo = {"a": 0, "b": 10_000, "c": 20_000}[batch.source]
        assert bool(((batch.input_ids >= lo) & (batch.input_ids < lo + 1001)).all())  # rows come from the tagged source
        assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])  # labels are the next tokens
        assert torch.equal(batch.labels[:, -1], batch.input_ids[:, -1] + 1)
    for name, share in (("a", 0.6), ("b", 0.3), ("c", 0.1)):
        assert abs(seen[name] / 3000 - share) < 0.04


def test_every_window_is_seen_once_per_epoch() -> None:
    mb = MixedBatches({"a": torch.arange(0, 401)}, {"a": 1.0}, seq_len=10, batch_size=8, seed=3)
    starts = [int(r[0]) for _ in range(5) for r in mb.next().input_ids]
    assert sorted(starts) == list(range(0, 400, 10))
    assert starts != sorted(starts)  # shuffled


def test_position_state_resumes_the_same_sequence() -> None:
    a = MixedBatches(_streams(), {"a": 1.0, "b": 1.0, "c": 1.0}, seq_len=10, batch_size=4, seed=5)
    for _ in range(37):
        a.next()
    state = a.state_dict()
    b = MixedBatches(_streams(), {"a": 1.0, "b": 1.0, "c": 1.0}, seq_len=10, batch_size=4, seed=5)
    b.load_state_dict(state)
    for _ in range(50):
        x, y = a.next(), b.next()
        assert x.source == y.source and torch.equal(x.input_ids, y.input_ids)
    with pytest.raises(TrainingError, match="data sources"):
        MixedBatches({"a": torch.arange(500)}, {"a": 1.0}, 10, 4, 5).load_state_dict(state)


def test_corpus_smaller_than_one_batch() -> None:
    with pytest.raises(TrainingError, match=r"data \(a\): 40 tokens give 3 windows .* fewer than one batch \(batch_size=4\)"):
        MixedBatches({"a": torch.arange(40)}, {"a": 1.0}, seq_len=12, batch_size=4, seed=0)


def test_shard_batch_splits_rows() -> None:
    batch = MixedBatches({"a": torch.arange(1001)}, {"a": 1.0}, 10, 4, 0).next()
    parts = [shard_batch(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([parts[0].input_ids, parts[1].input_ids]).sort(0).values, batch.input_ids.sort(0).values)
    assert parts[0].tokens + parts[1].tokens == batch.tokens


def test_text_helpers(tmp_path: Path) -> None:
    text = "one\ntwo two\nthree three three\n"
    assert cut_at_line(text, 12) == "one\ntwo two\n"
    assert cut_at_line(text, 1000) == text
    head, tail = split_holdout(text, 0.4)
    assert head + tail == text and head.endswith("\n") and tail
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("beta\n")
    (tmp_path / "d" / "sub" / "a.txt").write_text("alpha\n")
    (tmp_path / "d" / ".git").mkdir()
    (tmp_path / "d" / ".git" / "x").write_bytes(b"\xff")
    docs = load_documents(SourceConfig(name="d", path=str(tmp_path / "d")), "data[0]")
    assert docs == ["beta\n", "alpha\n"]
    cut = load_documents(SourceConfig(name="d", path=str(tmp_path / "d"), max_bytes=5), "data[0]")
    assert cut == ["beta\n"]


def test_holdout_becomes_a_validation_set(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    loaded = load_sources(
        [SourceConfig(name="t", path=str(tmp_path / "t.txt"), holdout=0.1)],
        [SourceConfig(name="shakespeare", corpus="tinyshakespeare")],
        eval_max_bytes=2000,
    )
    assert loaded.train["t"][0].endswith("line 89\n") or loaded.train["t"][0].endswith("line 90\n")
    assert [e.name for e in loaded.eval] == ["t", "shakespeare"]
    assert loaded.eval[0].text.startswith("line 9") and loaded.eval[1].bytes <= 2000


def test_score_ids_equals_the_models_own_loss() -> None:
    torch.manual_seed(0)
    cfg = ChiarConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=64, routing="soft")
    model = ChiarLM(cfg).eval()
    ids = torch.randint(3, 50, (40,)).tolist()
    nll, n, routing = score_ids(model, ids, seq_len=64, stride=32, batch_size=4)
    with torch.no_grad():
        out = model(torch.tensor([ids[:-1]]), labels=torch.tensor([ids[1:]]))
    assert n == 39 and math.isclose(nll / n, float(out.loss), rel_tol=1e-5)
    assert len(routing["attention_share"]) == 3 and routing["gate"] is not None and 0.0 <= routing["gate_open"] <= 1.0
    assert [sorted(layer) for layer in routing["operator_share"]] == [["attention", "dct", "identity", "rbf"]] * 3
    # windows shorter than the text: every token still scored once
    nll_w, n_w, _ = score_ids(model, ids, seq_len=16, stride=8, batch_size=3)
    assert n_w == 39 and nll_w > 0
    m = metrics(Perplexity(nll, n, words=10, bytes=100))
    assert math.isclose(m["token_ppl"], math.exp(nll / 39)) and math.isclose(m["word_ppl"], math.exp(nll / 10))
    assert math.isclose(m["bits_per_byte"], nll / (100 * math.log(2)))
