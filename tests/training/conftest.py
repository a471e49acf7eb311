"""Fixtures for the training tests: tiny real corpora and a trained tiny baseline run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.helpers import REPO, WIKI_VALID, head_bytes, tiny_train_config


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.txt (~40 KB of WikiText-2 valid) and test.txt (~8 KB of WikiText-2 test)."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text(head_bytes(WIKI_VALID, 40_000), encoding="utf-8")
    (d / "test.txt").write_text(head_bytes(REPO / "data" / "wikitext-2" / "test.txt", 8_000), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> dict[str, Path]:
    """A tiny baseline trained once per session (run dir + exported checkpoint)."""
    from training.config import TrainConfig, parse_config
    from training.loop import train

    root = tmp_path_factory.mktemp("baseline")
    cfg = tiny_train_config(root / "run", corpus_dir, export_dir=str(root / "export"))
    train(parse_config(TrainConfig, cfg))
    return {"run": root / "run", "export": root / "export", "root": root}
