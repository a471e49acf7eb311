"""`plot` writes real, non-empty PNG figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.helpers import REPO, tiny_train_config, write_config
from training.__main__ import main
from training.config import TrainConfig, parse_config
from training.loop import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_are_non_empty_pngs(
    tmp_path: Path, corpus_dir: Path, baseline_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tiny_train_config(tmp_path / "chiar", corpus_dir, export_dir=str(tmp_path / "chiar-ckpt"), max_steps=4, eval_every=2)
    raw["model"].update(arch="chiar", routing="soft")
    train(parse_config(TrainConfig, raw))
    cfg = {
        "out_dir": str(tmp_path / "plots"),
        "runs": [str(baseline_run["run"]), str(tmp_path / "chiar")],
        "labels": ["base", "chiar"],
        "heatmap": {"checkpoint": str(tmp_path / "chiar-ckpt"), "text": "The game began in 2011 . [MAX 2 9 ] = 9", "max_tokens": 24},
    }
    assert main(["plot", "--config", str(write_config(tmp_path / "plot.yaml", cfg))]) == 0
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == [
        "base-attention_share.png", "chiar-attention_share.png", "chiar-gate_by_source.png", "routing_heatmap.png", "val_ppl.png",
    ]  # no gate figure for the baseline (it has no MetaRouter)
    for name in written:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert capsys.readouterr().out.count("wrote ") == 5


def test_plot_of_a_missing_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {"out_dir": str(tmp_path / "plots"), "runs": [str(tmp_path / "nope")]}
    assert main(["plot", "--config", str(write_config(tmp_path / "plot.yaml", cfg))]) == 2
    assert "log.jsonl not found" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


def test_plot_without_matplotlib_is_a_clear_error(tmp_path: Path) -> None:
    """matplotlib is in the dev extra only: a runtime install gets one error line, not an ImportError."""
    cfg = write_config(tmp_path / "plot.yaml", {"out_dir": str(tmp_path / "plots"), "runs": [str(tmp_path)]})
    code = "import sys; sys.modules['matplotlib'] = None; from training.__main__ import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "plot", "--config", str(cfg)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: plot: needs matplotlib") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "plots").exists()
