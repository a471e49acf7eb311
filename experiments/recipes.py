"""The runs the experiments share: baseline -> calibration -> CHIAR variants (trained once, cached)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.cli import Context, log
from experiments.common import best_checkpoint, ensure_calibrated, ensure_trained, train_config


def baseline_config(ctx: Context, seed: int) -> dict[str, Any]:
    """The full-attention baseline of the experiment size; it trains the shared tokenizer."""
    return train_config(ctx, f"baseline-s{seed}", seed, {"arch": "baseline"})


def baseline(ctx: Context, seed: int) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(config, run marker, best checkpoint) of the trained baseline."""
    cfg = baseline_config(ctx, seed)
    done = ensure_trained(cfg)
    return cfg, done, best_checkpoint(Path(cfg["out_dir"]))


def calibration(ctx: Context, seed: int) -> dict[str, Any]:
    """Thresholds and three-operator bands measured on the frozen baseline (the paper's protocol).

    Returns the calibration report (`thresholds`, `bands`, per-layer percentiles); cached per
    baseline run.
    """
    _, done, ckpt = baseline(ctx, seed)
    name = f"calibration-s{seed}"
    cache = ctx.run_dir(name) / "calibration.json"
    if cache.is_file():
        report = json.loads(cache.read_text(encoding="utf-8"))
        if report.get("baseline_digest") == done["digest"]:
            return report
    template = chiar_config(ctx, seed, "threshold", thresholds=None, name="calibration-template")
    template["model"].pop("thresholds", None)
    log(f"calibrate on {ckpt}")
    report = ensure_calibrated(ctx, ckpt, template, name)["report"]
    report["baseline_digest"] = done["digest"]
    cache.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def chiar_config(ctx: Context, seed: int, routing: str, thresholds: list[float] | None,
                 bands: list[list[float]] | None = None, name: str | None = None,
                 operators: tuple[str, ...] = ("dct", "attn"), data: list[dict[str, Any]] | None = None,
                 **overrides: Any) -> dict[str, Any]:
    """A CHIAR train config sharing the baseline's tokenizer."""
    tok = str(best_checkpoint(ctx.run_dir(f"baseline-s{seed}")))
    model: dict[str, Any] = {"arch": "chiar", "routing": routing, "operators": list(operators)}
    if thresholds is not None:
        model["thresholds"] = thresholds
    if bands is not None:
        model["bands"] = bands
    run = name or f"chiar-{routing}-s{seed}"
    return train_config(ctx, run, seed, model, data=data, tokenizer=tok, **overrides)


def chiar_variant(ctx: Context, seed: int, routing: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, run marker) of one ablation row, calibrated on the frozen baseline."""
    cal = calibration(ctx, seed)
    cfg = chiar_config(ctx, seed, routing, cal["thresholds"])
    return cfg, ensure_trained(cfg)
