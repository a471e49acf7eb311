"""Atomic checkpoint directories, stale-leftover cleanup, exact training-state round trip (no pickle)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from model import ChiarConfig, ChiarLM
from training.checkpointing import (
    STATE_JSON,
    STATE_TENSORS,
    atomic_directory,
    clean_stale,
    list_checkpoints,
    load_training_checkpoint,
    prune_checkpoints,
    save_training_checkpoint,
)
from training.errors import TrainingError
from training.tokenizer import train_tokenizer


def test_atomic_directory_replaces_or_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with atomic_directory(target) as staging:
        staging.mkdir()
        (staging / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as staging:
        staging.mkdir()
        (staging / "a").write_text("2")
        raise RuntimeError("boom")
    assert (target / "a").read_text() == "1"  # old content intact
    with atomic_directory(target) as staging:
        staging.mkdir()
        (staging / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging leftovers


def test_clean_stale_removes_leftovers_and_restores_mid_replacement(tmp_path: Path) -> None:
    (tmp_path / ".tmp-step-00000010-123").mkdir()
    (tmp_path / "..tmp-step-00000010-123.tmp-abcd").mkdir()  # save_checkpoint's own staging
    (tmp_path / ".old-best-77").mkdir()  # killed between the two renames: best/ is missing
    (tmp_path / ".old-best-77" / "x").write_text("kept")
    (tmp_path / "step-00000005").mkdir()
    (tmp_path / ".other-hidden").mkdir()
    clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other-hidden", "best", "step-00000005"]
    assert (tmp_path / "best" / "x").read_text() == "kept"


def _tiny(weights_dtype: str = "float32", dropout: float = 0.1) -> tuple[ChiarLM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    cfg = ChiarConfig(vocab_size=300, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=16,
                      routing="soft", dropout=dropout, weights_dtype=weights_dtype)
    model = ChiarLM(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: ChiarLM, opt: torch.optim.Optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 9), generator=g)
    out = model(ids[:, :-1], labels=ids[:, 1:])
    (out.loss + out.aux_loss).backward()
    opt.step()
    opt.zero_grad()
    return float(out.loss.detach())


@pytest.mark.parametrize("weights_dtype", ["float32", "bfloat16"])
def test_training_state_round_trip_is_exact(tmp_path: Path, weights_dtype: str) -> None:
    tok = train_tokenizer(["some text to train a tokenizer on " * 20], vocab_size=300)
    model, opt = _tiny(weights_dtype)
    for s in range(3):
        _step(model, opt, s)
    random.seed(123)
    path = tmp_path / "step-00000003"
    save_training_checkpoint(path, model, tok, opt, {"step": 3, "data": {"x": 1}, "best": {"metric": None}})
    expected = [_step(model, opt, s) for s in range(3, 6)]
    expected_py = random.random()

    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", STATE_JSON, STATE_TENSORS}
    meta = json.loads((path / STATE_JSON).read_text())
    assert meta["step"] == 3 and meta["master_weights"] == (weights_dtype != "float32")
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in path.iterdir())

    fresh, fresh_opt = _tiny(weights_dtype)
    torch.manual_seed(999)  # scrambled RNG, restored by the load
    random.seed(999)
    load_training_checkpoint(path, fresh, fresh_opt)
    assert [_step(fresh, fresh_opt, s) for s in range(3, 6)] == expected
    assert random.random() == expected_py
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_list_and_prune(tmp_path: Path) -> None:
    for step in (5, 10, 15):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / STATE_JSON).write_text("{}")
    (tmp_path / "step-00000020").mkdir()  # unfinished: no training state
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10, 15]
    prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 15]


def test_loading_into_a_different_architecture_fails(tmp_path: Path) -> None:
    tok = train_tokenizer(["some text to train a tokenizer on " * 20], vocab_size=300)
    model, opt = _tiny()
    save_training_checkpoint(tmp_path / "c", model, tok, opt, {"step": 1, "data": {}, "best": {}})
    cfg = model.config.replace(arch="baseline", thresholds=None, bands=None)
    other = ChiarLM(cfg)
    with pytest.raises(TrainingError, match=r"arch 'chiar' but model\.arch is 'baseline'"):
        load_training_checkpoint(tmp_path / "c", other, torch.optim.AdamW(other.parameters()))
