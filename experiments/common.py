"""Shared pieces of the paper-reproduction experiments: train configs, cached runs, scoring and routing profiles.

Every experiment builds plain train/calibrate config dicts and runs them through the project's own
training module (`training.loop.train`, `training.calibrate.calibrate`, `training.evaluate`). A run is
cached: its directory holds `experiment_run.json` with the hash of the config that produced it, so
the ablation's baseline, calibration and CHIAR rows are reused by the other experiments instead of
being trained twice. Outputs live under `runs/experiments/<size>/` (gitignored).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.cli import Context, log
from experiments.sizes import Size
from training.calibrate import calibrate, load_frozen
from training.config import CalibrateConfig, TrainConfig, parse_config
from training.data import EvalText, load_sources
from training.evaluate import evaluate_texts
from training.loop import train


# ---------------------------------------------------------------------------- configs
def wiki_sources(size: Size) -> list[dict[str, Any]]:
    """Default protocol: train on WikiText-2 valid, its last 5% held out as the validation set."""
    src: dict[str, Any] = {"name": "wikitext2", "corpus": "wikitext2-valid", "holdout": 0.05}
    if size.train_max_bytes:
        src["max_bytes"] = size.train_max_bytes
    return [src]


def test_source(size: Size) -> dict[str, Any]:
    src: dict[str, Any] = {"name": "wikitext2-test", "corpus": "wikitext2-test"}
    if size.test_max_bytes:
        src["max_bytes"] = size.test_max_bytes
    return src


def train_config(ctx: Context, name: str, seed: int, model: dict[str, Any], data: list[dict[str, Any]] | None = None,
                 tokenizer: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A complete train config dict for `python -m training train` (also written next to the run)."""
    s = ctx.size
    cfg: dict[str, Any] = {
        "out_dir": str(ctx.run_dir(name)),
        "model": {**s.model, **model},
        "data": copy.deepcopy(data if data is not None else wiki_sources(s)),
        "eval_data": [],
        "tokenizer": {"path": tokenizer} if tokenizer else {"vocab_size": s.vocab_size},
        "seq_len": s.seq_len,
        "batch_size": s.batch_size,
        "max_steps": s.max_steps,
        "warmup_steps": s.warmup_steps,
        "lr": s.lr,
        "min_lr": s.lr / 10,
        "seed": seed,
        "device": ctx.device,
        "threads": ctx.threads,
        "eval_every": s.eval_every,
        "eval_max_bytes": s.val_max_bytes,
        "checkpoint_every": s.max_steps,
        "keep_last": 1,
        "resume": "auto",
        "progress": False,
    }
    cfg.update(overrides)
    return cfg


def _digest(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def ensure_trained(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train `cfg` unless its out_dir already holds a finished run of exactly this config."""
    out = Path(cfg["out_dir"])
    marker = out / "experiment_run.json"
    digest = _digest(cfg)
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("digest") == digest:
            log(f"reuse {out} (trained {done['seconds']:.0f}s)")
            return done
    if out.exists():
        shutil.rmtree(out)  # a different config or an unfinished run: start clean
    out.mkdir(parents=True)
    (out / "experiment_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    log(f"train {out} ({cfg['model'].get('arch')}/{cfg['model'].get('routing', '-')}, {cfg['max_steps']} steps)")
    t0 = time.perf_counter()
    summary = train(parse_config(TrainConfig, copy.deepcopy(cfg)))
    done = {"digest": digest, "seconds": time.perf_counter() - t0, "params": summary["params"],
            "best": summary["best"], "steps": summary["steps"]}
    marker.write_text(json.dumps(done, indent=1), encoding="utf-8")
    log(f"done {out} in {done['seconds']:.0f}s, best {summary['best']}")
    return done


def ensure_calibrated(ctx: Context, baseline_dir: Path, template: dict[str, Any], name: str) -> dict[str, Any]:
    """Calibrate `template` (a CHIAR train config dict) on the frozen baseline; returns the calibrated config."""
    out = ctx.run_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    template_path = out / "template.json"
    template_path.write_text(json.dumps(template, indent=1), encoding="utf-8")
    source = {**wiki_sources(ctx.size)[0]}
    source.pop("holdout")
    cal = parse_config(CalibrateConfig, {
        "checkpoint": str(baseline_dir), "data": [source], "template": str(template_path),
        "output": str(out / "calibrated.json"), "report": str(out / "calibration.json"), "seq_len": ctx.size.seq_len,
        "batch_size": 8, "max_tokens": 65_536 if ctx.size.name != "tiny" else 4096, "device": ctx.device,
    })
    report = calibrate(cal)
    calibrated = json.loads((out / "calibrated.json").read_text(encoding="utf-8"))
    return {"config": calibrated, "report": report}


def best_checkpoint(run_dir: Path) -> Path:
    """The run's best-validation model (falls back to its last step checkpoint)."""
    best = run_dir / "best"
    if best.is_dir():
        return best
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
    if not steps:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint")
    return steps[-1]


# ---------------------------------------------------------------------------- scoring
def eval_texts(cfg: dict[str, Any], extra: list[dict[str, Any]] | None = None) -> list[EvalText]:
    """The validation holdouts of a train config's sources plus `extra` eval sources (as EvalTexts)."""
    tc = parse_config(TrainConfig, {**copy.deepcopy(cfg), "eval_data": copy.deepcopy(extra or [])})
    texts = load_sources(tc.data, tc.eval_data, None).eval
    cut = cfg.get("eval_max_bytes")
    held = {s["name"] for s in cfg["data"] if s.get("holdout")}
    return [EvalText(t.name, _cut(t.text, cut)) if t.name in held else t for t in texts]


def _cut(text: str, max_bytes: int | None) -> str:
    from training.data import cut_at_line

    return cut_at_line(text, max_bytes) if max_bytes else text


def score(checkpoint: Path, texts: list[EvalText], seq_len: int, paths: tuple[str, ...], device: str = "auto",
          ) -> dict[str, dict[str, dict[str, Any]]]:
    """{path: {text name: metrics}} of a checkpoint (sliding windows, stride seq_len // 2)."""
    dev = resolve(device)
    model, tok = load_frozen(str(checkpoint), dev)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    return {p: evaluate_texts(model, tok, texts, seq_len, max(seq_len // 2, 1), 8, p, dev, amp) for p in paths}


def resolve(device: str) -> torch.device:
    from model.device import resolve_device

    return resolve_device(device)


@torch.no_grad()
def routing_profile(model: Any, ids: list[int], seq_len: int, path: str = "infer", max_windows: int | None = None,
                    batch_size: int = 8, device: torch.device | None = None) -> dict[str, Any]:
    """Operator counts [L,4], entropies [tokens, L], gates [tokens] and FLOPs over windows of `ids`."""
    device = device or torch.device("cpu")
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"routing_profile: fewer than seq_len={seq_len} tokens")
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    counts = torch.zeros(model.config.n_layers, 4, dtype=torch.long)
    ents, gates = [], []
    executed = dense = 0.0
    for start in range(0, n, batch_size):
        x = windows[start : start + batch_size].to(device)
        out = model.infer(x) if path == "infer" else model(x, hard=True if path == "hard" else None)
        counts += out.routing.counts.cpu().long()
        ents.append(out.routing.entropy.float().cpu().reshape(-1, model.config.n_layers).numpy())
        gates.append(out.routing.gate.float().cpu().reshape(-1).numpy())
        executed += float(out.flops.executed)
        dense += float(out.flops.dense)
    tokens = n * seq_len
    return {"counts": counts, "entropy": np.concatenate(ents), "gate": np.concatenate(gates), "tokens": tokens,
            "flops_executed": executed, "flops_dense": dense}


def mean_std(values: list[float]) -> dict[str, float | int | None]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else None, "n": int(arr.size)}


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
