"""Helpers for the training tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO, WIKI

WIKI_VALID = WIKI / "valid.txt"

TINY_MODEL = {"d_model": 32, "n_layers": 3, "n_heads": 2, "d_ff": 64, "max_seq_len": 32}


def head_bytes(path: Path, n: int) -> str:
    """The first whole lines of a real corpus within n bytes."""
    text = path.read_text(encoding="utf-8")[: n * 2]
    data = text.encode("utf-8")[:n]
    return data[: data.rfind(b"\n") + 1].decode("utf-8")


def tiny_train_config(out_dir: Path, corpus: Path, **overrides: Any) -> dict[str, Any]:
    """A complete, valid train config for a seconds-long CPU run."""
    cfg: dict[str, Any] = {
        "out_dir": str(out_dir),
        "model": {"arch": "baseline", **TINY_MODEL},
        "data": [
            {"name": "wiki", "path": str(corpus / "train.txt"), "holdout": 0.1},
            {"name": "listops", "listops": {"num_examples": 300, "max_depth": 2, "max_length": 30}, "weight": 0.3},
        ],
        "eval_data": [{"name": "test", "path": str(corpus / "test.txt")}],
        "tokenizer": {"vocab_size": 300},
        "seq_len": 16,
        "batch_size": 4,
        "max_steps": 8,
        "warmup_steps": 2,
        "lr": 3e-3,
        "eval_every": 4,
        "eval_batch_size": 8,
        "checkpoint_every": 4,
        "threads": 1,
        "progress": False,
    }
    for key, value in overrides.items():
        cfg[key] = value
    return copy.deepcopy(cfg)


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg) if path.suffix == ".json" else yaml.safe_dump(cfg), encoding="utf-8")
    return path


def read_log(run_dir: Path, kind: str = "train") -> list[dict[str, Any]]:
    """The train (or eval) records of a run's log.jsonl."""
    from training.plots import read_log as read_both

    train, evals = read_both(run_dir)
    return train if kind == "train" else evals


def run_module(args: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`python -m <args>` in the repository root, one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
