"""PNG figures: validation PPL curves, attention share per layer, MetaRouter gate per source, routing heatmap.

matplotlib is in the dev extra only (the serving image does not need it); without it `plot` stops
with one clear error instead of an ImportError, and the rest of `training` works.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from model import Operator
from training.calibrate import load_frozen
from training.config import PlotConfig
from training.errors import TrainingError
from training.paths import check_path_usable, probe_writable

# operator id -> colour, the playground's chiaroscuro: light warm = attention, dark cool = DCT
# (identity: near white, RBF: mid green, pad: grey)
OPERATOR_COLOURS = {-1: "#d9d9d9", 0: "#ffffff", 1: "#1f2545", 2: "#4fae8a", 3: "#f6e3a1"}
OPERATOR_LABELS = {int(op): op.label for op in Operator}


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or a TrainingError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise TrainingError("plot: needs matplotlib, which only the dev extra installs: "
                            "pip install -e '.[dev]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) of a run directory's log.jsonl."""
    path = Path(run_dir) / "log.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TrainingError(f"runs: {path} not found; is {run_dir} a training run directory?") from None
    train, evals = [], []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        (evals if rec.get("kind") == "eval" else train).append(rec)
    if not train:
        raise TrainingError(f"runs: {path} holds no training records")
    return train, evals


def _save(fig: Any, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def plot_val_ppl(runs: list[str], labels: list[str], out: Path, source: str | None = None) -> Path:
    """Validation token PPL over steps, one line per (run, validation set)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for run, label in zip(runs, labels):
        _, evals = read_log(run)
        names = sorted({n for e in evals for n in e["sets"]})
        for name in names:
            if source is not None and name != source:
                continue
            pts = [(e["step"], e["sets"][name]["token_ppl"]) for e in evals if name in e["sets"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"{label} · {name}")
                drawn += 1
    if not drawn:
        plt.close(fig)
        raise TrainingError(f"runs: no validation records{f' for source {source!r}' if source else ''} to plot")
    ax.set_xlabel("step")
    ax.set_ylabel("validation token PPL")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Validation perplexity")
    return _save(fig, out)


def plot_attention_share(run: str, label: str, out: Path) -> Path:
    """Share of tokens routed to attention, per layer, over training."""
    plt = _pyplot()
    train, _ = read_log(run)
    steps = [r["step"] for r in train]
    shares = [r["attention_share"] for r in train]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer in range(len(shares[0])):
        ax.plot(steps, [s[layer] for s in shares], label=f"L{layer + 1}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("attention share")
    ax.set_title(f"Attention share per layer · {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, out)


def plot_gate_by_source(run: str, label: str, out: Path) -> Path | None:
    """MetaRouter gate (mean g) per data source over training; None when the run has no gate."""
    plt = _pyplot()
    train, _ = read_log(run)
    by_source: dict[str, list[tuple[int, float]]] = {}
    for r in train:
        for name, g in (r.get("gate_by_source") or {}).items():
            by_source.setdefault(name, []).append((r["step"], g))
    if not by_source:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(by_source.items()):
        ax.plot(*zip(*pts), marker=".", ms=3, lw=1, label=name)
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("MetaRouter gate g")
    ax.set_title(f"MetaRouter gate per source · {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


@torch.no_grad()
def plot_routing_heatmap(checkpoint: str, text: str, out: Path, path: str = "infer", max_tokens: int = 64) -> Path:
    """Operators per token (x) and layer (y) for one text: light = attention, dark = DCT."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    model, tokenizer = load_frozen(checkpoint, torch.device("cpu"), "heatmap.checkpoint")
    ids = tokenizer.encode(text, add_special_tokens=False).ids[:max_tokens]
    if not ids:
        raise TrainingError("heatmap.text: tokenizes to no tokens")
    inp = torch.tensor([[model.config.bos_token_id, *ids]])
    out_ = model.infer(inp) if path == "infer" else model(inp, hard=True if path == "hard" else None)
    ops = out_.routing.operator[0, 1:].to(torch.int64).T.numpy()  # [L, T], BOS dropped
    present = sorted({-1, 0, 1, 2, 3})
    cmap = ListedColormap([OPERATOR_COLOURS[k] for k in present])
    labels = [tokenizer.decode([i]).replace("\n", "\\n") or "·" for i in ids]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(ids) + 2), 0.45 * ops.shape[0] + 2))
    ax.imshow(ops, cmap=cmap, vmin=-1.5, vmax=3.5, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(ops.shape[0]), [f"L{i + 1}" for i in range(ops.shape[0])])
    ax.set_xlabel("token")
    ax.set_ylabel("layer")
    ax.set_title(f"Routing ({model.config.arch}, {path} path)")
    ax.legend(
        handles=[Patch(facecolor=OPERATOR_COLOURS[k], edgecolor="black", lw=0.5, label=v) for k, v in OPERATOR_LABELS.items()],
        loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
    )
    return _save(fig, out)


def run_plot(cfg: PlotConfig) -> list[Path]:
    """The `plot` command: write every figure the config asks for into out_dir."""
    _pyplot()  # fail before reading or writing anything
    out_dir = Path(cfg.out_dir)
    check_path_usable(out_dir, "out_dir")
    labels = cfg.labels or [Path(r).name for r in cfg.runs]
    for run in cfg.runs:
        read_log(run)  # fail before writing anything
    probe_writable(out_dir, "out_dir")
    written: list[Path] = []
    if cfg.runs:
        written.append(plot_val_ppl(cfg.runs, labels, out_dir / "val_ppl.png", cfg.source))
        for run, label in zip(cfg.runs, labels):
            written.append(plot_attention_share(run, label, out_dir / f"{label}-attention_share.png"))
            gate = plot_gate_by_source(run, label, out_dir / f"{label}-gate_by_source.png")
            if gate is not None:
                written.append(gate)
    if cfg.heatmap is not None:
        h = cfg.heatmap
        written.append(plot_routing_heatmap(h.checkpoint, h.text, out_dir / "routing_heatmap.png", h.path, h.max_tokens))
    return written
