"""The paper-reproduction experiment scripts run end to end at the tiny size and write their results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.training.helpers import run_module
from training.config import TrainConfig, parse_config


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """run_all at the tiny size with one CHIAR row (threshold_reg); every experiment's JSON."""
    root = tmp_path_factory.mktemp("experiments")
    proc = run_module(["experiments.run_all", "--size", "tiny", "--modes", "threshold_reg",
                       "--root", str(root), "--threads", "1", "--device", "cpu"], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = ("ablation", "routing_collapse", "mixed", "efficiency", "figures")
    return root / "tiny", {n: json.loads((root / "tiny" / f"{n}.json").read_text()) for n in names}


def _ppl(x: float) -> bool:
    return math.isfinite(x) and x > 1.0


def test_ablation_table(results: tuple[Path, dict[str, Any]]) -> None:
    _, r = results
    ab = r["ablation"]
    assert ab["size"] == "tiny" and ab["seeds"] == [0] and ab["modes"] == ["threshold_reg"]
    rows = {e["model"]: e for e in ab["table"]}
    assert list(rows) == ["baseline", "threshold_reg"]
    assert rows["baseline"]["paper_test_ppl"] == 44.63 and "test_ppl_infer" not in rows["baseline"]
    row = rows["threshold_reg"]
    for key in ("val_ppl", "test_ppl", "test_ppl_infer"):
        assert _ppl(row[key]["mean"]) and row[key]["n"] == 1
    gap = row["test_ppl_infer"]["mean"] - row["test_ppl"]["mean"]
    assert row["hard_gap"]["mean"] == pytest.approx(gap)
    assert len(row["attention_share_infer"]) == 4 and row["attention_share_infer"][-1] == 1.0
    # CHIAR has fewer parameters than the baseline (no attention in L1) and thresholds come from calibration
    assert row["params"] < rows["baseline"]["params"]
    assert len(ab["calibration"]["0"]["thresholds"]) == 2


def test_routing_collapse_per_epoch(results: tuple[Path, dict[str, Any]]) -> None:
    root, r = results
    rc = r["routing_collapse"]
    assert [e["epoch"] for e in rc["epochs"]] == [0, 1, 2]
    for e in rc["epochs"]:
        for layer in e["validation_reference"]:
            assert set(layer) == {"identity", "dct", "rbf", "attention"}
            assert sum(layer.values()) == pytest.approx(1.0, abs=1e-3)
        assert e["validation_reference"][-1]["attention"] == 1.0  # last layer: always attention
    assert rc["rbf_collapsed_at_epoch"] is None or rc["rbf_collapsed_at_epoch"] in (0, 1, 2)
    assert (root / "collapse_operator_share.png").stat().st_size > 1000


def test_mixed_per_source(results: tuple[Path, dict[str, Any]]) -> None:
    root, r = results
    mx = r["mixed"]
    sources = {"wikitext2", "shakespeare", "listops", "wikitext2-test"}
    for model in ("single", "mixed"):
        for path in ("reference", "infer"):
            assert set(mx[model]["ppl"][path]) == sources
            assert all(_ppl(v) for v in mx[model]["ppl"][path].values())
        assert set(mx[model]["gate"]) == sources
        assert all(0.0 <= g["mean"] <= 1.0 and 0.0 <= g["open_share"] <= 1.0 for g in mx[model]["gate"].values())
        acc = mx[model]["listops_accuracy"]["infer"]
        assert acc["examples"] >= 1 and 0.0 <= acc["accuracy"] <= 1.0
    # the mixed run saw every source, and its training log carries the gate per source
    assert set(mx["sources_per_step"]) <= {"wikitext2", "shakespeare", "listops"}
    assert all(set(g) <= {"wikitext2", "shakespeare", "listops"} for _, g in mx["gate_trajectory"]["mixed"])
    parse_config(TrainConfig, mx["mixed_config"])  # the recorded config is a valid train config
    assert (root / "mixed_gate_by_source.png").is_file()


def test_efficiency_rows(results: tuple[Path, dict[str, Any]]) -> None:
    _, r = results
    rows = {row["model"]: row for row in r["efficiency"]["table"]}
    assert list(rows) == ["baseline", "threshold_reg"]
    assert rows["baseline"]["executed_vs_baseline"] == 1.0
    chiar = rows["threshold_reg"]
    assert 0.0 < chiar["flops_per_token"] < chiar["dense_flops_per_token"]  # hard gating skips work
    assert chiar["tokens_per_s_infer"]["median"] > 0 and chiar["params"] > 0


def test_figures_written(results: tuple[Path, dict[str, Any]]) -> None:
    root, r = results
    fig = r["figures"]
    assert fig["heatmap_model"] == "threshold_reg"
    for name in ("routing_heatmap.png", "entropy_histograms.png", "attention_share_per_layer.png"):
        assert (root / name).stat().st_size > 1000
    assert len(fig["entropy"]["baseline"]) == 2 and len(fig["attention_share_infer"]["threshold_reg"]) == 4


@pytest.mark.parametrize("size", ["cpu", "cpu4m", "gpu"])
def test_full_size_configs_are_valid(size: str, tmp_path: Path) -> None:
    """The CPU and GPU recipes (not trained here) are valid train configs of the documented size."""
    from experiments.cli import Context
    from experiments.common import train_config
    from experiments.recipes import baseline_config
    from experiments.sizes import SIZES
    from model import ChiarConfig, ChiarLM

    ctx = Context(SIZES[size], [0], tmp_path, "cpu", None, False)
    base = parse_config(TrainConfig, baseline_config(ctx, 0))
    n_routing = base.model.n_layers - 2
    chiar = parse_config(TrainConfig, train_config(ctx, "x", 0, {"arch": "chiar", "routing": "threshold_reg",
                                                                  "thresholds": [0.85] * n_routing}))
    assert base.seq_len <= base.model.max_seq_len and chiar.model.arch == "chiar"
    params = ChiarLM(ChiarConfig.from_dict({**chiar.model.to_dict(), "vocab_size": SIZES[size].vocab_size})).num_parameters()
    expected = {"cpu": (0.8e6, 1.5e6), "cpu4m": (3.8e6, 5e6), "gpu": (14e6, 20e6)}[size]
    assert expected[0] < params < expected[1]
