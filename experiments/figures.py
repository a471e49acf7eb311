"""Analysis figures (paper Sec. 6) from the ablation's checkpoints.

1. routing heatmap of a WikiText-2 test paragraph through the hard-gated inference path
   (threshold_reg model; light = DCT, dark = attention);
2. spectral-entropy histograms per routing layer: the frozen baseline's distribution that the
   calibration measured, and the trained CHIAR (threshold_reg) model's, with the calibrated
   thresholds tau (and p33/p67) marked;
3. attention share per layer of every CHIAR variant through the inference path.

    python -m experiments.figures --size cpu [--publish]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from experiments.cli import Context, experiment_main, log
from experiments.common import (
    best_checkpoint,
    resolve,
    routing_profile,
    test_source,
)
from experiments.recipes import baseline, calibration, chiar_variant
from training.calibrate import load_frozen
from training.config import SourceConfig
from training.data import load_documents
from training.evaluate import attention_shares
from training.plots import plot_routing_heatmap

HEATMAP_MODEL = "threshold_reg"


def paragraph(text: str, min_words: int = 40) -> str:
    """The first WikiText-2 paragraph (not a heading) with at least `min_words` words."""
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("=") and len(line.split()) >= min_words:
            return line
    return " ".join(text.split()[:min_words])


def entropy_histograms(base: dict[str, Any], chiar: dict[str, Any], cal: dict[str, Any], out: Path, label: str) -> Path:
    layers = cal["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.3 * len(layers), 2.8), squeeze=False)
    for ax, lay in zip(axes[0], layers):
        i = lay["layer"]
        b = base["entropy"][:, i]
        c = chiar["entropy"][:, i]
        b, c = b[~np.isnan(b)], c[~np.isnan(c)]
        lo = float(min(b.min(), c.min()))
        bins = np.linspace(lo, 1.0, 50)
        ax.hist(b, bins=bins, alpha=0.55, color="#888888", density=True, label="frozen baseline")
        ax.hist(c, bins=bins, alpha=0.55, color="#c0504d", density=True, label=f"CHIAR {label}")
        ax.axvline(lay["threshold"], color="black", lw=1.2, label="tau (calibrated)")
        for p in (lay["p33"], lay["p67"]):
            ax.axvline(p, color="black", lw=0.7, ls=":")
        ax.set_title(f"layer L{i + 1}", fontsize=9)
        ax.set_xlabel("spectral entropy H")
    axes[0][0].set_ylabel("density")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("Spectral entropy per routing layer (WikiText-2 test); dotted: p33, p67", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def attention_share_bars(shares: dict[str, list[float]], out: Path) -> Path:
    names = list(shares)
    n_layers = len(next(iter(shares.values())))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    for k, name in enumerate(names):
        xs = np.arange(n_layers) + (k - (len(names) - 1) / 2) * width
        ax.bar(xs, shares[name], width=width, label=name)
    ax.set_xticks(range(n_layers), [f"L{i + 1}" for i in range(n_layers)])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share routed to attention")
    ax.set_title("Attention share per layer (inference path, WikiText-2 test)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def run(ctx: Context) -> tuple[dict[str, Any], list[Path]]:
    seed = ctx.seeds[0]
    device = resolve(ctx.device)
    base_ckpt = baseline(ctx, seed)[2]
    cal = calibration(ctx, seed)
    ckpts = {}
    for mode in ctx.modes:
        cfg, _ = chiar_variant(ctx, seed, mode)
        ckpts[mode] = best_checkpoint(Path(cfg["out_dir"]))
    heat_mode = HEATMAP_MODEL if HEATMAP_MODEL in ckpts else ctx.modes[-1]
    text = "".join(load_documents(SourceConfig(**test_source(ctx.size)), "test"))
    para = paragraph(text, 40 if ctx.size.name != "tiny" else 5)
    figures = []
    max_tokens = 64 if ctx.size.name != "tiny" else 16
    heat = plot_routing_heatmap(str(ckpts[heat_mode]), para, ctx.root / "routing_heatmap.png", "infer", max_tokens)
    figures.append(heat)

    windows = 16 if ctx.size.name != "tiny" else 2
    seq = ctx.size.seq_len
    profiles, shares = {}, {}
    for name, ckpt in (("baseline", base_ckpt), *ckpts.items()):
        model, tok = load_frozen(str(ckpt), device)
        ids = [1, *tok.encode(text, add_special_tokens=False).ids]
        # the baseline through the reference path (it reports H at every layer, as calibration saw it)
        path = "reference" if name == "baseline" else "infer"
        profiles[name] = routing_profile(model, ids, seq, path, windows, device=device)
        if name != "baseline":
            shares[name] = [round(share, 4) for share in attention_shares(profiles[name]["counts"])]
        log(f"profiled {name}")
    figures.append(entropy_histograms(profiles["baseline"], profiles[heat_mode], cal,
                                      ctx.root / "entropy_histograms.png", heat_mode))
    figures.append(attention_share_bars(shares, ctx.root / "attention_share_per_layer.png"))
    ent = {}
    for name in ("baseline", heat_mode):
        e = profiles[name]["entropy"]
        ent[name] = [{"layer": lay["layer"], "mean": float(np.nanmean(e[:, lay["layer"]])),
                      "share_above_tau": float(np.nanmean(e[:, lay["layer"]] >= lay["threshold"]))}
                     for lay in cal["layers"]]
    with torch.no_grad():
        trained_tau = {m: load_frozen(str(c), torch.device("cpu"))[0].routing_thresholds() for m, c in ckpts.items()}
    result = {"heatmap_text": para, "heatmap_model": heat_mode, "attention_share_infer": shares,
              "entropy": ent, "calibration": cal["layers"], "thresholds_after_training": trained_tau,
              "figures": [str(f) for f in figures]}
    return result, figures


def main(argv: list[str] | None = None) -> int:
    return experiment_main(__doc__, lambda ctx, _: ("figures", *run(ctx)), argv)


if __name__ == "__main__":
    raise SystemExit(main())
