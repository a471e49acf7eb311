"""Markdown tables of the experiments' results JSON (the numbers pasted into EXPERIMENTS.md).

    python -m experiments.report [--size cpu] [--dir experiments/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from experiments.ablation import format_table as ablation_table
from experiments.efficiency import format_table as efficiency_table
from model.config import routing_layers


def _load(directory: Path, name: str, size: str) -> dict[str, Any] | None:
    path = directory / f"{name}-{size}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def collapse_table(r: dict[str, Any]) -> str:
    layers = routing_layers(len(r["epochs"][0]["validation_reference"]))
    lines = ["| epoch | step | " + " | ".join(f"L{i + 1} dct / rbf / attn" for i in layers) + " |",
             "|---:|---:|" + "---|" * len(layers)]
    for e in r["epochs"]:
        shares = [e["validation_reference"][i] for i in layers]
        cells = [f"{s['dct']:.2f} / {s['rbf']:.2f} / {s['attention']:.2f}" for s in shares]
        lines.append(f"| {e['epoch']} | {e['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collapse_infer_table(r: dict[str, Any]) -> str:
    layers = routing_layers(len(r["epochs"][0]["train_sample_infer"]))
    lines = ["| epoch | " + " | ".join(f"L{i + 1} rbf (train text, infer)" for i in layers) + " |",
             "|---:|" + "---:|" * len(layers)]
    for e in r["epochs"]:
        lines.append(f"| {e['epoch']} | " + " | ".join(f"{e['train_sample_infer'][i]['rbf']:.3f}" for i in layers) + " |")
    return "\n".join(lines)


def mixed_table(r: dict[str, Any]) -> str:
    sources = list(r["mixed"]["ppl"]["reference"])
    lines = ["| model | path | " + " | ".join(f"{s} PPL" for s in sources) + " | ListOps accuracy (majority class) |",
             "|---|---|" + "---:|" * (len(sources) + 1)]
    for model in ("single", "mixed"):
        for path in ("reference", "infer"):
            acc = r[model]["listops_accuracy"][path]
            acc_s = "-" if acc["accuracy"] is None else f"{acc['accuracy']:.3f} ({acc['majority_accuracy']:.3f}, n={acc['examples']})"
            lines.append(f"| {model} | {path} | " + " | ".join(f"{r[model]['ppl'][path][s]:.2f}" for s in sources)
                         + f" | {acc_s} |")
    return "\n".join(lines)


def gate_table(r: dict[str, Any]) -> str:
    sources = list(r["mixed"]["gate"])
    lines = ["| model | " + " | ".join(f"{s}: mean g / open share / attn share" for s in sources) + " |",
             "|---|" + "---|" * len(sources)]
    for model in ("single", "mixed"):
        g = r[model]["gate"]
        lines.append(f"| {model} | " + " | ".join(
            f"{g[s]['mean']:.3f} / {g[s]['open_share']:.2f} / {g[s]['attention_share_routing_layers']:.2f}" for s in sources) + " |")
    return "\n".join(lines)


def gate_trajectory(r: dict[str, Any], every: int = 25) -> str:
    traj = r["gate_trajectory"]["mixed"]
    names = sorted({n for _, g in traj for n in g})
    lines = ["| steps | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for lo in range(0, len(traj), every):
        chunk = traj[lo : lo + every]
        cells = []
        for n in names:
            vals = [g[n] for _, g in chunk if n in g]
            cells.append(f"{sum(vals) / len(vals):.4f}" if vals else "-")
        lines.append(f"| {chunk[0][0]}-{chunk[-1][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="cpu")
    parser.add_argument("--dir", default="experiments/results")
    args = parser.parse_args(argv)
    d = Path(args.dir)
    if (r := _load(d, "ablation", args.size)) is not None:
        print("## ablation\n" + ablation_table(r["table"]) + "\n")
    if (r := _load(d, "routing_collapse", args.size)) is not None:
        print(f"## routing collapse (steps/epoch {r['steps_per_epoch']}, collapsed at epoch {r['rbf_collapsed_at_epoch']})")
        print(collapse_table(r) + "\n\n" + collapse_infer_table(r) + "\n")
    if (r := _load(d, "mixed", args.size)) is not None:
        print("## mixed\n" + mixed_table(r) + "\n\n" + gate_table(r) + "\n\n" + gate_trajectory(r) + "\n")
    if (r := _load(d, "efficiency", args.size)) is not None:
        print("## efficiency\n" + efficiency_table(r["table"]) + "\n")
    if (r := _load(d, "figures", args.size)) is not None:
        print("## figures\n" + json.dumps({k: r[k] for k in ("attention_share_infer", "entropy", "thresholds_after_training")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
