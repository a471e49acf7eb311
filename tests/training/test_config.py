"""Config files: YAML/JSON, --set overrides, unknown keys and invalid values named by field."""

from __future__ import annotations

from pathlib import Path

import pytest

from model import ChiarConfig
from tests.training.helpers import REPO, tiny_train_config, write_config
from training.__main__ import main
from training.config import (
    CalibrateConfig,
    EvalConfig,
    PlotConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    parse_config,
)
from training.errors import TrainingError


def test_yaml_and_json_give_the_same_config(tmp_path: Path, corpus_dir: Path) -> None:
    raw = tiny_train_config(tmp_path / "run", corpus_dir)
    a = load_config(TrainConfig, write_config(tmp_path / "c.yaml", raw))
    b = load_config(TrainConfig, write_config(tmp_path / "c.json", raw))
    assert a == b
    assert isinstance(a.model, ChiarConfig) and a.model.d_model == 32
    assert a.data[1].listops is not None and a.data[1].listops.max_depth == 2


def test_set_overrides_parse_values_and_index_lists(tmp_path: Path, corpus_dir: Path) -> None:
    path = write_config(tmp_path / "c.yaml", tiny_train_config(tmp_path / "run", corpus_dir))
    cfg = load_config(
        TrainConfig, path,
        ["model.d_model=64", "data.1.weight=2.5", "betas=[0.8, 0.9]", "progress=true", "model.routing=soft"],
    )
    assert cfg.model.d_model == 64 and cfg.data[1].weight == 2.5 and cfg.betas == [0.8, 0.9] and cfg.progress
    assert cfg.model.routing == "soft"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("bogus=1", "bogus: unknown key"),
        ("model.bogus=1", "model.bogus: unknown"),
        ("data.0.bogus=1", "data[0].bogus: unknown key"),
        ("data.1.listops.depth=3", "data[1].listops.depth: unknown key"),
        ("batch_size=0", "batch_size: must be positive"),
        ("batch_size=two", "batch_size: must be an integer"),
        ("lr=-1", "lr: must be a positive number"),
        ("min_lr=1", "min_lr: must be in [0, lr]"),
        ("betas=[0.9]", "betas: must be two numbers"),
        ("precision=fp8", "precision: must be one of"),
        ("device=tpu", "device: must be auto, cpu, cuda"),
        ("seq_len=64", "seq_len: 64 exceeds model.max_seq_len"),
        ("model.d_model=33", "model.d_model: must be divisible by n_heads"),
        ("model.arch=gpt", "model.arch: must be one of"),
        ("model.vocab_size=512", "model.vocab_size: set by the tokenizer"),
        ("data.0.weight=0", "data[0].weight: must be a positive number"),
        ("data.0.holdout=1.5", "data[0].holdout: must be in [0, 1)"),
        ("data.0.corpus=wikitext103", "data[0]: needs exactly one of path, corpus, listops"),
        ("data.1.listops.max_args=1", "data[1].listops.max_args: must be >= 2"),
        ("data=[]", "data: needs at least one training source"),
        ("best_source=nope", "best_source: 'nope' is not a validation set"),
        ("tokenizer.vocab_size=100", "tokenizer.vocab_size: must be >= 259"),
        ("out_dir=null", "out_dir: must not be null"),
    ],
)
def test_bad_config_values_exit_2_naming_the_field(
    tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str], override: str, field: str
) -> None:
    out_dir = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", tiny_train_config(out_dir, corpus_dir))
    assert main(["train", "--config", str(path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err, err
    assert not out_dir.exists()


def test_threshold_routing_without_thresholds_is_a_clear_error(
    tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tiny_train_config(tmp_path / "run", corpus_dir)
    raw["model"].update(arch="chiar", routing="threshold_reg")
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    err = capsys.readouterr().err
    assert "model.thresholds" in err and "calibrate" in err
    raw["model"]["routing"] = "threshold"
    with pytest.raises(TrainingError, match=r"model\.thresholds"):
        parse_config(TrainConfig, raw)
    raw["model"]["thresholds"] = [0.8]
    assert parse_config(TrainConfig, raw).model.thresholds == [0.8]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("out_dir: [unclosed", ".yaml", "is not valid YAML"),
        ("{", ".json", "is not valid JSON"),
        ("- a\n- b\n", ".yaml", "must hold a mapping"),
        ("a: 1", ".toml", "must end in .yaml, .yml or .json"),
    ],
)
def test_unreadable_config_files(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    with pytest.raises(TrainingError, match=message):
        load_config(TrainConfig, path)
    with pytest.raises(TrainingError, match="file not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_bad_set_syntax() -> None:
    with pytest.raises(TrainingError, match="expected key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(TrainingError, match=r"data.5 is not an index"):
        apply_overrides({"data": [{}]}, ["data.5.name=x"])


def test_shipped_configs_are_valid() -> None:
    """Every config in training/configs parses (the CHIAR template only once calibrated)."""
    configs = REPO / "training" / "configs"
    assert load_config(TrainConfig, configs / "baseline-small.yaml").model.arch == "baseline"
    with pytest.raises(TrainingError, match=r"model\.thresholds"):
        load_config(TrainConfig, configs / "chiar-small.yaml")
    chiar = load_config(TrainConfig, configs / "chiar-small.yaml", ["model.thresholds=[0.8, 0.8, 0.8, 0.8]"])
    baseline = load_config(TrainConfig, configs / "baseline-small.yaml")
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
        assert getattr(chiar.model, name) == getattr(baseline.model, name)
    assert load_config(CalibrateConfig, configs / "calibrate-small.yaml").template.endswith("chiar-small.yaml")
    assert load_config(EvalConfig, configs / "eval-wikitext2.yaml").paths == ["reference", "infer"]
    assert len(load_config(PlotConfig, configs / "plots-demo.yaml").runs) == 2
    experiments = sorted((REPO / "experiments").glob("*.yaml"))
    assert experiments
    for path in experiments:  # templates for threshold modes are checked with placeholder thresholds
        cfg = load_config(TrainConfig, path, ["model.thresholds=[0.8, 0.8, 0.8, 0.8]"] if "template" in path.name else [])
        assert cfg.model.n_layers == 6
