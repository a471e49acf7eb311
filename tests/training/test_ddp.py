"""torchrun + DDP on 2 CPU processes (gloo): identical replicas, same loss as one process, same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.training.helpers import REPO, read_log, tiny_train_config, write_config


def test_two_process_gloo_matches_single_process(tmp_path: Path, corpus_dir: Path) -> None:
    raw = tiny_train_config(tmp_path / "ddp", corpus_dir, max_steps=6, grad_accum=2, eval_every=3, checkpoint_every=3)
    raw["model"].update(arch="chiar", routing="soft")  # exercises MetaRouter and learnable router parameters
    ddp_cfg = write_config(tmp_path / "ddp.yaml", raw)
    single_cfg = write_config(tmp_path / "single.yaml", {**raw, "out_dir": str(tmp_path / "single")})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "training", "train", "--config", str(ddp_cfg)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    single = subprocess.run(
        [sys.executable, "-m", "training", "train", "--config", str(single_cfg)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    _, err = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]

    check = json.loads((tmp_path / "ddp" / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and check["identical"] and len(set(check["digests"])) == 1

    a, b = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))  # rank 0 logs once
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (x["step"], x["loss"], y["loss"])
        assert x["tokens"] == y["tokens"] == 2 * 4 * 16 and x["sources"] == y["sources"]
        assert max(abs(p - q) for p, q in zip(x["attention_share"], y["attention_share"])) <= 0.02
    ea, eb = read_log(tmp_path / "ddp", "eval"), read_log(tmp_path / "single", "eval")
    assert [e["step"] for e in ea] == [3, 6]
    for x, y in zip(ea, eb):
        for name in x["sets"]:
            assert abs(x["sets"][name]["token_ppl"] / y["sets"][name]["token_ppl"] - 1) < 1e-4

    # one set of checkpoints (rank 0 only), weights equal to the single-process run's up to fp32 reduction order
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    wa = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-00000006" / "model.safetensors"))
    wb = load_file(str(tmp_path / "single" / "checkpoints" / "step-00000006" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-4)
