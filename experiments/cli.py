"""The one command line of every experiment: shared flags, the run context, and result files.

    python -m experiments.<name> --size cpu [--seeds 0 1 2] [--modes ...] [--publish]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.sizes import ROUTING_MODES, SIZES, Size

ROOT = Path("runs/experiments")
RESULTS_DIR = Path("experiments/results")
FIGURES_DIR = Path("docs/figures")

# What an experiment's body returns: (result name, result JSON, figures to publish).
Outcome = tuple[str, dict[str, Any], list[Path]]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu", help="experiment size (default cpu)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    parser.add_argument("--root", default=str(ROOT), help="output root (runs/experiments)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--modes", nargs="+", choices=ROUTING_MODES, default=list(ROUTING_MODES),
                        help="CHIAR routing modes of the ablation rows (default: all four)")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the results JSON to experiments/results/ and figures to docs/figures/")


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


def experiment_main(doc: str, body: Callable[[Context, argparse.Namespace], Outcome], argv: list[str] | None = None,
                    extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse the shared flags (plus `extra_args`), run `body`, write its result; the exit status."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(parser)
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    ctx = Context.from_args(args)
    name, result, figures = body(ctx, args)
    write_result(ctx, name, result, figures)
    return 0


def hardware() -> dict[str, Any]:
    """What produced the numbers: CPU or the GPU's name."""
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_result(ctx: Context, name: str, result: dict[str, Any], figures: list[Path] | tuple[()] = ()) -> Path:
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


def markdown_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A markdown table; `align` has one letter a column (l or r), default: first left, others right."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---|" if a == "l" else "---:|" for a in align)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
