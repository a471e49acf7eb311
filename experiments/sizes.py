"""Experiment sizes: the model and recipe of each `--size` (tiny for tests, cpu, cpu4m, gpu)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROUTING_MODES = ("soft", "ste", "threshold", "threshold_reg")


@dataclass(frozen=True)
class Size:
    """Model and recipe of one experiment size."""

    name: str
    model: dict[str, Any]
    vocab_size: int
    seq_len: int
    batch_size: int
    max_steps: int
    warmup_steps: int
    lr: float
    eval_every: int
    val_max_bytes: int | None  # validation holdout scored during training and in the tables
    test_max_bytes: int | None  # WikiText-2 test bytes scored (None: the whole file)
    collapse_bytes: int  # WikiText-2 valid bytes for the multi-epoch three-operator run
    collapse_epochs: int
    listops_examples: int
    listops_max_length: int
    listops_eval: int  # held-out ListOps examples scored for final-answer accuracy
    train_max_bytes: int | None = None  # cut of every training corpus (tiny size only)
    speed_batches: int = 4  # batches timed for tokens/s


SIZES: dict[str, Size] = {
    # seconds; used by tests/experiments/test_experiments.py
    "tiny": Size(
        "tiny", {"d_model": 32, "n_layers": 4, "n_heads": 2, "d_ff": 64, "max_seq_len": 32},
        vocab_size=300, seq_len=32, batch_size=4, max_steps=4, warmup_steps=1, lr=3e-3, eval_every=2,
        val_max_bytes=1_500, test_max_bytes=1_500, collapse_bytes=1_500, collapse_epochs=2,
        listops_examples=300, listops_max_length=12, listops_eval=10, train_max_bytes=15_000, speed_batches=1,
    ),
    # ~1M parameters: what 2 shared CPU cores train in the 40-minute budget of all experiments together
    "cpu": Size(
        "cpu", {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 384, "max_seq_len": 128},
        vocab_size=2048, seq_len=128, batch_size=8, max_steps=200, warmup_steps=20, lr=2e-3, eval_every=50,
        val_max_bytes=20_000, test_max_bytes=50_000, collapse_bytes=100_000, collapse_epochs=10,
        listops_examples=6000, listops_max_length=60, listops_eval=200,
    ),
    # ~4.5M parameters: the CPU ablation size (~2 min a run on 2 idle cores)
    "cpu4m": Size(
        "cpu4m", {"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 768, "max_seq_len": 128},
        vocab_size=4096, seq_len=128, batch_size=8, max_steps=200, warmup_steps=20, lr=1.5e-3, eval_every=50,
        val_max_bytes=20_000, test_max_bytes=50_000, collapse_bytes=100_000, collapse_epochs=10,
        listops_examples=6000, listops_max_length=60, listops_eval=200,
    ),
    # ~16M parameters (the paper's ablation size); for a GPU
    "gpu": Size(
        "gpu", {"d_model": 384, "n_layers": 8, "n_heads": 6, "d_ff": 1024, "max_seq_len": 256},
        vocab_size=8192, seq_len=256, batch_size=32, max_steps=4000, warmup_steps=200, lr=1e-3, eval_every=250,
        val_max_bytes=None, test_max_bytes=None, collapse_bytes=1_200_000, collapse_epochs=6,
        listops_examples=40000, listops_max_length=200, listops_eval=1000, speed_batches=8,
    ),
}
