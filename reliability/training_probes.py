"""Random SIGKILLs during a real training run, then resume; compared with an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from loadtests.server_process import ROOT
from reliability.report import ProbeResult

MAX_STEPS = 40


def _corpus(work: Path) -> Path:
    d = work / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    for name, source, size in (("train.txt", "valid.txt", 40_000), ("test.txt", "test.txt", 8_000)):
        text = (ROOT / "data" / "wikitext-2" / source).read_text(encoding="utf-8")[: size * 2].encode()[:size]
        (d / name).write_bytes(text[: text.rfind(b"\n") + 1])
    return d


def _config(work: Path, corpus: Path, name: str) -> Path:
    cfg = {
        "out_dir": str(work / name),
        "model": {"arch": "chiar", "routing": "soft", "d_model": 32, "n_layers": 3, "n_heads": 2, "d_ff": 64,
                  "max_seq_len": 32, "dropout": 0.1},
        "data": [{"name": "wiki", "path": str(corpus / "train.txt"), "holdout": 0.1}],
        "eval_data": [{"name": "test", "path": str(corpus / "test.txt")}],
        "tokenizer": {"vocab_size": 300}, "seq_len": 16, "batch_size": 4, "max_steps": MAX_STEPS, "warmup_steps": 2,
        "lr": 3e-3, "eval_every": 20, "eval_batch_size": 8, "checkpoint_every": 3, "keep_last": 2, "threads": 1,
        "progress": False,
    }
    path = work / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _popen(config: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "training", "train", "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _steps(run: Path) -> dict[int, float]:
    log = run / "log.jsonl"
    out: dict[int, float] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("kind") == "train":
                out[rec["step"]] = rec["loss"]
    return out


def probe_training_kills(work: Path, short: bool) -> ProbeResult:
    import torch
    from safetensors.torch import load_file

    from model import CheckpointError, load_checkpoint

    kills = 2 if short else 12
    rng = random.Random(14)
    work.mkdir(parents=True, exist_ok=True)
    corpus = _corpus(work)
    reference = _popen(_config(work, corpus, "reference"))
    ref_err = reference.communicate(timeout=1800)[1].decode(errors="replace")
    victim_cfg = _config(work, corpus, "victim")
    killed, failures, corrupt, checked = 0, [], [], 0
    attempts = 0
    while True:
        attempts += 1
        proc = _popen(victim_cfg)
        if killed < kills:
            target = max(_steps(work / "victim"), default=0) + rng.randrange(1, 6)
            deadline = time.monotonic() + 600
            while proc.poll() is None and max(_steps(work / "victim"), default=0) < target and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.0, 0.05))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed += 1
                for ckpt in sorted((work / "victim" / "checkpoints").glob("step-*")):
                    checked += 1
                    try:
                        load_checkpoint(ckpt)
                    except CheckpointError as exc:
                        corrupt.append(str(exc))
                continue
        err = proc.communicate(timeout=1800)[1].decode(errors="replace")
        if proc.returncode != 0:
            failures.append(f"resume attempt {attempts} exited {proc.returncode}: {err[-300:]}")
        break
    final = f"step-{MAX_STEPS:08d}"
    diff = float("nan")
    try:
        a = load_file(str(work / "reference" / "checkpoints" / final / "model.safetensors"))
        b = load_file(str(work / "victim" / "checkpoints" / final / "model.safetensors"))
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    except (OSError, KeyError, RuntimeError) as exc:
        failures.append(f"final checkpoints not comparable: {exc}; reference stderr: {ref_err[-300:]}")
    ref_loss, vic_loss = _steps(work / "reference"), _steps(work / "victim")
    loss_diff = max((abs(ref_loss[s] - vic_loss[s]) for s in ref_loss if s in vic_loss), default=float("nan"))
    exact = diff <= 1e-5 and len(vic_loss) == len(ref_loss) == MAX_STEPS
    del torch
    return ProbeResult(
        "training-kills", f"a {MAX_STEPS}-step CHIAR training run (dropout on, checkpoint every 3 steps) SIGKILLed at "
        f"{kills} random points and resumed each time, against an uninterrupted run with the same config", kills,
        f"{checked} checkpoint loads after kills, {checked - len(corrupt)} intact; final weights max |diff| {diff:.2e}; "
        f"train-loss max |diff| {loss_diff:.2e}", f"{len(corrupt)} corrupt checkpoints; {len(failures)} failed resumes",
        passed=exact and not corrupt and not failures,
        figures={"kills": killed, "runs started": attempts, "final weights max abs diff": f"{diff:.3e}",
                 "steps logged (victim / reference)": f"{len(vic_loss)} / {len(ref_loss)}"},
        failures=corrupt + failures)
