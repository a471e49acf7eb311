"""Routing collapse (paper Sec. 4): the three-operator DCT + RBF + attention model.

The router starts at the entropy bands calibrated on the frozen baseline (H < p33 -> DCT,
p33..p67 -> RBF, >= p67 -> attention) and is trained (soft, learnable) for several epochs of a
WikiText-2 valid subset. After every epoch the checkpoint routes the held-out validation text and
a sample of the training text; we report the share of tokens per operator per layer per epoch
(epoch 0 = the initialisation) and the first epoch at which RBF's share falls below 1% in every
routing layer.

    python -m experiments.routing_collapse --size cpu [--publish]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from experiments.cli import Context, Outcome, experiment_main, log
from experiments.common import (
    ensure_trained,
    resolve,
    routing_profile,
)
from experiments.recipes import baseline, calibration, chiar_config
from model import ChiarConfig, ChiarLM
from model.config import routing_layers
from training.calibrate import load_frozen
from training.config import TrainConfig, parse_config
from training.data import encode_documents, load_sources
from training.evaluate import operator_shares
from training.plots import read_log

COLLAPSE_SHARE = 0.01


def _rbf_shares(rec: dict[str, Any]) -> list[float]:
    """The RBF share of each routing layer in an epoch record (validation text, reference path)."""
    shares = rec["validation_reference"]
    return [shares[layer]["rbf"] for layer in routing_layers(len(shares))]


def collapse_config(ctx: Context, seed: int) -> tuple[dict[str, Any], int]:
    """The three-operator train config and its steps per epoch."""
    cal = calibration(ctx, seed)
    data = [{"name": "wikitext2", "corpus": "wikitext2-valid", "holdout": 0.05, "max_bytes": ctx.size.collapse_bytes}]
    cfg = chiar_config(ctx, seed, "soft", cal["thresholds"], cal["bands"], name=f"three-operator-s{seed}-e{ctx.size.collapse_epochs}",
                       operators=("dct", "rbf", "attn"), data=data)
    _, _, ckpt = baseline(ctx, seed)
    _, tok = load_frozen(str(ckpt), torch.device("cpu"))
    docs = load_sources(parse_config(TrainConfig, json.loads(json.dumps(cfg))).data, [], None).train["wikitext2"]
    n_tokens = encode_documents(tok, docs, 1, 2).numel()
    steps_per_epoch = max(((n_tokens - 1) // ctx.size.seq_len) // ctx.size.batch_size, 1)
    epochs = ctx.size.collapse_epochs
    cfg.update(max_steps=steps_per_epoch * epochs, eval_every=steps_per_epoch, checkpoint_every=steps_per_epoch,
               keep_last=epochs + 1, warmup_steps=min(ctx.size.warmup_steps, steps_per_epoch))
    return cfg, steps_per_epoch


def _ids(tok: Any, text: str) -> list[int]:
    return [1, *tok.encode(text, add_special_tokens=False).ids]


def run(ctx: Context, suffix: str = "") -> tuple[dict[str, Any], list[Path]]:
    seed = ctx.seeds[0]
    cfg, spe = collapse_config(ctx, seed)
    ensure_trained(cfg)
    run_dir = Path(cfg["out_dir"])
    tc = parse_config(TrainConfig, json.loads(json.dumps(cfg)))
    sources = load_sources(tc.data, [], None)
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    _, tok = load_frozen(str(ckpts[-1]), torch.device("cpu"))
    val_ids = _ids(tok, sources.eval[0].text)
    train_ids = _ids(tok, sources.train["wikitext2"][0])
    windows = 16 if ctx.size.name != "tiny" else 2
    device = resolve(ctx.device)

    # epoch 0: the initial model exactly as the training loop builds it (seed, calibrated bands)
    init_cfg = ChiarConfig.from_dict({**tc.model.to_dict(), "vocab_size": tok.get_vocab_size()})
    torch.manual_seed(seed)
    models: list[tuple[int, int, Any]] = [(0, 0, ChiarLM(init_cfg).eval())]
    for i, path in enumerate(ckpts, start=1):
        step = int(path.name.split("-")[1])
        models.append((i, step, load_frozen(str(path), device)[0]))
    epochs = []
    for epoch, step, model in models:
        model = model.to(device)
        rec: dict[str, Any] = {"epoch": epoch, "step": step}
        for label, ids in (("validation", val_ids), ("train_sample", train_ids)):
            for path in ("reference", "infer"):
                prof = routing_profile(model, ids, ctx.size.seq_len, path, windows, device=device)
                rec[f"{label}_{path}"] = operator_shares(prof["counts"])
        rec["bands"] = model.routing_bands()
        epochs.append(rec)
        log(f"epoch {epoch} (step {step}): RBF share per routing layer {_rbf_shares(rec)}")
    collapsed = next((e["epoch"] for e in epochs if all(share < COLLAPSE_SHARE for share in _rbf_shares(e))), None)
    train_recs, eval_recs = read_log(run_dir)
    fig = plot_shares(epochs, ctx.root / f"collapse_operator_share{suffix}.png")
    result = {
        "run": str(run_dir), "steps_per_epoch": spe, "epochs": epochs,
        "collapse_threshold": COLLAPSE_SHARE, "rbf_collapsed_at_epoch": collapsed,
        "paper": "RBF share 0% by epoch 3 (three operators collapse to DCT + attention)",
        "attention_share_per_step": [[r["step"], r["attention_share"]] for r in train_recs],
        "val_ppl_per_epoch": [[r["step"], r["sets"]["wikitext2"]["token_ppl"]] for r in eval_recs],
        "params": ChiarLM(init_cfg).num_parameters(),
    }
    return result, [fig]


def plot_shares(epochs: list[dict[str, Any]], out: Path) -> Path:
    """Stacked operator shares per routing layer over epochs (validation text, training-mode routing)."""
    layers = list(range(1, len(epochs[0]["validation_reference"]) - 1))
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.0), sharey=True, squeeze=False)
    colours = {"dct": "#e6c35c", "rbf": "#6fa8dc", "attention": "#1f1d3d"}
    xs = [e["epoch"] for e in epochs]
    for ax, layer in zip(axes[0], layers):
        bottom = [0.0] * len(xs)
        for op, colour in colours.items():
            vals = [e["validation_reference"][layer][op] for e in epochs]
            ax.bar(xs, vals, bottom=bottom, color=colour, label=op, width=0.7)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"layer L{layer + 1}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_xticks(xs)
    axes[0][0].set_ylabel("share of tokens")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Three-operator routing per epoch (validation text)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _epochs_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the subset (default: the size's)")


def _body(ctx: Context, args: argparse.Namespace) -> Outcome:
    if args.epochs is not None:
        ctx.size = dataclasses.replace(ctx.size, collapse_epochs=args.epochs)
    suffix = "" if args.epochs is None else f"-{args.epochs}epochs"
    return (f"routing_collapse{suffix}", *run(ctx, suffix))


def main(argv: list[str] | None = None) -> int:
    return experiment_main(__doc__, _body, argv, extra_args=_epochs_arg)


if __name__ == "__main__":
    raise SystemExit(main())
