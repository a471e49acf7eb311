"""A run killed with SIGKILL and resumed continues the uninterrupted trajectory (CPU, 1e-6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.training.helpers import REPO, read_log, run_module, tiny_train_config, write_config

KILL_AFTER_STEP = 17  # checkpoints every 5 steps: resumes from 15 and redoes 16-17


def _config(tmp_path: Path, corpus_dir: Path, name: str) -> Path:
    raw = tiny_train_config(
        tmp_path / name, corpus_dir, max_steps=100, eval_every=10, checkpoint_every=5, grad_accum=2, keep_last=2,
        export_dir=str(tmp_path / f"{name}-export"),
    )
    # dropout makes the RNG state matter; bf16 storage makes the fp32 master weights matter
    raw["model"].update(arch="chiar", routing="soft", dropout=0.1, weights_dtype="bfloat16")
    return write_config(tmp_path / f"{name}.yaml", raw)


def _popen(config: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "training", "train", "--config", str(config)], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _last_step(log: Path) -> int:
    if not log.exists():
        return 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path, corpus_dir: Path) -> None:
    reference = _popen(_config(tmp_path, corpus_dir, "reference"))
    victim_cfg = _config(tmp_path, corpus_dir, "victim")
    victim = _popen(victim_cfg)
    victim_log = tmp_path / "victim" / "log.jsonl"
    deadline = time.monotonic() + 240
    while _last_step(victim_log) < KILL_AFTER_STEP:
        assert victim.poll() is None, f"victim exited before it could be killed: {victim.stderr.read() if victim.stderr else ''}"
        assert time.monotonic() < deadline, "victim made no progress"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    killed_at = _last_step(victim_log)
    assert killed_at < 100, "the kill came too late to test anything"
    assert not (tmp_path / "victim-export").exists()

    resumed = run_module(["training", "train", "--config", str(victim_cfg)], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read() if reference.stderr else ""

    ref, res = read_log(tmp_path / "reference"), read_log(tmp_path / "victim")
    assert [r["step"] for r in res] == list(range(1, 101))  # every step exactly once, re-done steps replaced
    for a, b in zip(ref, res):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["step"], a["loss"], b["loss"])
        assert a["sources"] == b["sources"] and a["lr"] == b["lr"]
    ref_eval, res_eval = read_log(tmp_path / "reference", "eval"), read_log(tmp_path / "victim", "eval")
    assert [e["step"] for e in res_eval] == [e["step"] for e in ref_eval] == list(range(10, 101, 10))
    for a, b in zip(ref_eval, res_eval):
        for name in a["sets"]:
            assert abs(a["sets"][name]["token_ppl"] - b["sets"][name]["token_ppl"]) <= 1e-6 * a["sets"][name]["token_ppl"]

    w_ref = load_file(str(tmp_path / "reference-export" / "model.safetensors"))
    w_res = load_file(str(tmp_path / "victim-export" / "model.safetensors"))
    assert w_ref.keys() == w_res.keys()
    for name in w_ref:
        assert torch.equal(w_ref[name], w_res[name]), name
    ckpts = tmp_path / "victim" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000095", "step-00000100"]  # keep_last=2, no leftovers
