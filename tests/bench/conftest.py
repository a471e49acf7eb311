"""Fixtures of the benchmark tests: a full-attention twin of the tiny checkpoint (same shapes, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_baseline(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tokenizers import Tokenizer

    from model import ChiarConfig, ChiarLM, save_checkpoint

    config = ChiarConfig.from_json((tiny_checkpoint / "config.json").read_text()).replace(arch="baseline", thresholds=None)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_baseline") / "baseline-tiny"
    save_checkpoint(ChiarLM(config).eval(), Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")), path)
    return path
