"""Shared pieces of the paper-reproduction experiments: sizes, cached runs, scoring and routing profiles.

Every experiment builds plain train/calibrate config dicts and runs them through the project's own
training module (`training.loop.train`, `training.calibrate.calibrate`, `training.evaluate`). A run is
cached: its directory holds `experiment_run.json` with the hash of the config that produced it, so
the ablation's baseline, calibration and CHIAR rows are reused by the other experiments instead of
being trained twice. Outputs live under `runs/experiments/<size>/` (gitignored).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.calibrate import calibrate, load_frozen
from training.config import CalibrateConfig, TrainConfig, parse_config
from training.data import EvalText, load_sources
from training.evaluate import evaluate_texts
from training.loop import train

ROOT = Path("runs/experiments")
RESULTS_DIR = Path("training/experiments/results")
FIGURES_DIR = Path("docs/figures")
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
    # seconds; used by tests/training/test_experiments.py
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


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu", help="experiment size (default cpu)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    parser.add_argument("--root", default=str(ROOT), help="output root (runs/experiments)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--modes", nargs="+", choices=ROUTING_MODES, default=list(ROUTING_MODES),
                        help="CHIAR routing modes of the ablation rows (default: all four)")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the results JSON to training/experiments/results/ and figures to docs/figures/")


@dataclass
class Context:
    """Where one experiment invocation writes, and with which size/seeds/device."""

    size: Size
    seeds: list[int]
    root: Path
    device: str
    threads: int | None
    publish: bool
    modes: tuple[str, ...] = ROUTING_MODES

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        size = SIZES[args.size]
        root = Path(args.root) / size.name
        root.mkdir(parents=True, exist_ok=True)
        if args.threads:
            torch.set_num_threads(args.threads)
        modes = tuple(m for m in ROUTING_MODES if m in args.modes)
        return cls(size, list(args.seeds), root, args.device, args.threads, args.publish, modes)

    def run_dir(self, name: str) -> Path:
        return self.root / name


def hardware() -> dict[str, Any]:
    """What produced the numbers: CPU or the GPU's name."""
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
    cal = CalibrateConfig(
        checkpoint=str(baseline_dir), data=[], template=str(template_path), output=str(out / "calibrated.json"),
        report=str(out / "calibration.json"), seq_len=ctx.size.seq_len, batch_size=8,
        max_tokens=65_536 if ctx.size.name != "tiny" else 4096, device=ctx.device,
    )
    cal = parse_config(CalibrateConfig, {**{k: getattr(cal, k) for k in cal.__dataclass_fields__}, "data": [source]})
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


def read_train_log(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    train_recs, eval_recs = [], []
    for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        (eval_recs if rec["kind"] == "eval" else train_recs).append(rec)
    return train_recs, eval_recs


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
    from training.distributed import resolve_device

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


def operator_shares(counts: torch.Tensor) -> list[dict[str, float]]:
    """Per layer: share of tokens per operator name."""
    from model import OPERATOR_NAMES

    c = counts.double()
    totals = c.sum(-1).clamp(min=1)
    return [{name: round(float(c[layer, i] / totals[layer]), 4) for i, name in enumerate(OPERATOR_NAMES)}
            for layer in range(c.shape[0])]


def mean_std(values: list[float]) -> dict[str, float | int | None]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else None, "n": int(arr.size)}


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------- output
def write_result(ctx: Context, name: str, result: dict[str, Any], figures: list[Path] = ()) -> Path:
    """Write runs/experiments/<size>/<name>.json; with --publish also copy it (and figures) to the repo."""
    result = {"experiment": name, "size": ctx.size.name, "seeds": ctx.seeds, "modes": list(ctx.modes), "hardware": hardware(),
              "model_size": ctx.size.model, "recipe": _recipe(ctx.size), **result}
    out = ctx.root / f"{name}.json"
    out.write_text(json.dumps(result, indent=1, default=_json_default) + "\n", encoding="utf-8")
    log(f"wrote {out}")
    if ctx.publish:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, RESULTS_DIR / f"{name}-{ctx.size.name}.json")
        FIGURES_DIR.mkdir(parents=True, exist_ok=True)
        for fig in figures:
            shutil.copyfile(fig, FIGURES_DIR / f"{ctx.size.name}-{fig.name}")
    return out


def _recipe(size: Size) -> dict[str, Any]:
    return {k: getattr(size, k) for k in ("vocab_size", "seq_len", "batch_size", "max_steps", "warmup_steps", "lr",
                                           "val_max_bytes", "test_max_bytes")}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
