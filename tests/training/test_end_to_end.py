"""Tiny end-to-end: train baseline -> calibrate -> train CHIAR (threshold_reg) -> eval -> load in the model API."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model import load_checkpoint
from model.generate import generate
from model.hf_tokenizer import stale_files
from tests.training.helpers import read_log, tiny_train_config, write_config
from training.__main__ import main
from training.calibrate import collect_entropy
from training.config import TrainConfig, load_config


def test_train_calibrate_train_eval_load(tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tiny_train_config(tmp_path / "base", corpus_dir, export_dir=str(tmp_path / "ckpt" / "baseline"))
    base["model"]["n_layers"] = 4
    assert main(["train", "--config", str(write_config(tmp_path / "base.yaml", base))]) == 0
    assert stale_files(tmp_path / "ckpt" / "baseline") == []  # the export carries AutoTokenizer's files

    template = tiny_train_config(tmp_path / "chiar", corpus_dir, export_dir=str(tmp_path / "ckpt" / "chiar"))
    template["model"].update(arch="chiar", routing="threshold_reg", n_layers=4, weights_dtype="bfloat16")
    del template["tokenizer"]
    calib = {
        "checkpoint": str(tmp_path / "ckpt" / "baseline"),
        "data": [{"name": "wiki", "path": str(corpus_dir / "train.txt")}],
        "template": str(write_config(tmp_path / "chiar-template.yaml", template)),
        "output": str(tmp_path / "chiar.yaml"),
        "seq_len": 32,
        "max_tokens": 3000,
    }
    assert main(["calibrate", "--config", str(write_config(tmp_path / "calib.yaml", calib))]) == 0
    report = json.loads((tmp_path / "chiar.calibration.json").read_text())
    assert [layer["layer"] for layer in report["layers"]] == [1, 2]  # the CHIAR routing layers of a 4-layer model
    cfg = load_config(TrainConfig, tmp_path / "chiar.yaml")
    assert cfg.model.thresholds == report["thresholds"] and cfg.model.bands == report["bands"]
    assert cfg.tokenizer.path == str(tmp_path / "ckpt" / "baseline")  # shared tokenizer by default

    # the thresholds are the midpoints of p33/p67 of the frozen baseline's entropy at those layers
    frozen, tok = load_checkpoint(tmp_path / "ckpt" / "baseline")
    text = (corpus_dir / "train.txt").read_text()
    ids = torch.tensor([1, *tok.encode(text, add_special_tokens=False).ids, 2])[:3000]
    entropy = collect_entropy(frozen, ids, 32, 8, torch.device("cpu"))
    for layer, tau in zip((1, 2), cfg.model.thresholds):
        p33, p67 = np.percentile(entropy[:, layer], [33, 67])
        assert math.isclose(tau, (p33 + p67) / 2, abs_tol=1e-5)
        assert 0.0 < p33 <= tau <= p67 < 1.0

    assert main(["train", "--config", str(tmp_path / "chiar.yaml")]) == 0
    logs = read_log(tmp_path / "chiar")
    assert all(r["aux"] > 0 for r in logs)  # threshold_reg penalty is in the loss
    assert all(0.0 < r["attention_share"][1] < 1.0 for r in logs)  # routing layers really route
    assert all(r["gate"] is not None and 0 < r["gate"] < 1 for r in logs)
    for r in logs:  # every operator's share per layer, and the share of tokens whose hard gate opens
        assert [round(sum(layer.values()), 4) for layer in r["operator_share"]] == [1.0] * 4
        assert [layer["attention"] for layer in r["operator_share"]] == pytest.approx(r["attention_share"], abs=1e-6)
        assert 0.0 <= r["gate_open"] <= 1.0
    capsys.readouterr()

    evaluation = {
        "checkpoint": str(tmp_path / "ckpt" / "chiar"),
        "data": [{"name": "test", "path": str(corpus_dir / "test.txt")}],
        "seq_len": 32,
        "output": str(tmp_path / "eval.json"),
    }
    assert main(["eval", "--config", str(write_config(tmp_path / "eval.yaml", evaluation))]) == 0
    table = capsys.readouterr().out
    assert "reference" in table and "infer" in table
    result = json.loads((tmp_path / "eval.json").read_text())["results"]
    for path in ("reference", "infer"):
        m = result[path]["test"]
        assert 1.0 < m["token_ppl"] < 400  # vocab 300: better than uniform
        assert math.isclose(m["bits_per_byte"], m["nll"] / (math.log(2) * m["bytes"]))
        assert m["tokens"] > m["words"] > 0

    model, tokenizer = load_checkpoint(tmp_path / "ckpt" / "chiar")
    assert model.config.arch == "chiar" and model.config.thresholds is not None
    assert tokenizer.to_str() == load_checkpoint(tmp_path / "ckpt" / "baseline")[1].to_str()
    out = generate(model, torch.tensor([[1, *tokenizer.encode("The game").ids]]), max_new_tokens=5)
    assert len(out.tokens[0]) == 5
