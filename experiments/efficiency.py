"""Efficiency: parameters, executed FLOPs per token vs the dense baseline, scoring tokens/s.

For the ablation's baseline and four CHIAR rows (trained or reused from the cache), WikiText-2 test
windows of seq_len tokens go through the hard-gated inference path `model.infer`: FLOPs come from
the model's own accounting (`ModelOutput.flops`: executed, and `dense` = what the full-attention
baseline of the same size spends on the same tokens); tokens/s is wall-clock scoring throughput
(batches of 8 windows, median of several timed passes after a warm-up). The reference (training)
forward is timed too, for comparison.

    python -m experiments.efficiency --size cpu [--publish]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from experiments.cli import Context, experiment_main, log, markdown_table
from experiments.common import (
    best_checkpoint,
    resolve,
    routing_profile,
    test_source,
)
from experiments.recipes import baseline, chiar_variant
from training.calibrate import load_frozen
from training.config import SourceConfig
from training.data import load_documents
from training.evaluate import attention_shares

PAPER = (
    "400M: CHIAR 37% fewer FLOPs than the baseline (test PPL 27.51 vs 23.58); routing layers: 62.5% fewer attention FLOPs at ~50% routing"
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def tokens_per_s(model: Any, batch: torch.Tensor, path: str, repeats: int, device: torch.device) -> dict[str, float]:
    """Median and best scoring throughput of one batch through `path` (after one warm-up pass)."""

    def fwd() -> None:
        if path == "infer":
            model.infer(batch)
        else:
            model(batch)

    fwd()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd()
        _sync(device)
        times.append(time.perf_counter() - t0)
    n = batch.numel()
    return {"median": n / statistics.median(times), "best": n / min(times), "repeats": repeats}


def run(ctx: Context) -> dict[str, Any]:
    seed = ctx.seeds[0]
    rows: list[tuple[str, Path]] = [("baseline", baseline(ctx, seed)[2])]
    for mode in ctx.modes:
        cfg, _ = chiar_variant(ctx, seed, mode)
        rows.append((mode, best_checkpoint(Path(cfg["out_dir"]))))
    device = resolve(ctx.device)
    text = "".join(load_documents(SourceConfig(**test_source(ctx.size)), "test"))
    seq = ctx.size.seq_len
    table = []
    base_flops = None
    for name, ckpt in rows:
        model, tok = load_frozen(str(ckpt), device)
        ids = [1, *tok.encode(text, add_special_tokens=False).ids]
        windows = 32 if ctx.size.name != "tiny" else 2
        prof = routing_profile(model, ids, seq, "infer", windows, device=device)
        per_tok = prof["flops_executed"] / prof["tokens"]
        dense_tok = prof["flops_dense"] / prof["tokens"]
        base_flops = base_flops if base_flops is not None else per_tok
        n_batch = min(8, len(ids) // seq)
        batch = torch.tensor(ids[: n_batch * seq], dtype=torch.long).view(n_batch, seq).to(device)
        repeats = 5 if ctx.size.name != "tiny" else 1
        speed = {p: tokens_per_s(model, batch, p, repeats, device) for p in ("infer", "reference")}
        attn_share = [round(share, 4) for share in attention_shares(prof["counts"])]
        row = {
            "model": name,
            "params": model.num_parameters(),
            "flops_per_token": per_tok,
            "dense_flops_per_token": dense_tok,
            "executed_vs_own_dense": per_tok / dense_tok,
            "executed_vs_baseline": per_tok / base_flops,
            "attention_share": attn_share,
            "tokens_per_s_infer": speed["infer"],
            "tokens_per_s_reference": speed["reference"],
            "tokens_scored": prof["tokens"],
            "batch": list(batch.shape),
        }
        log(
            f"{name}: {per_tok / 1e6:.2f} MFLOP/token ({row['executed_vs_baseline']:.3f} of baseline), "
            f"infer {speed['infer']['median']:.0f} tok/s"
        )
        table.append(row)
    print(format_table(table))
    return {"table": table, "paper": PAPER, "device": str(device)}


def format_table(table: list[dict[str, Any]]) -> str:
    header = [
        "model",
        "params",
        "MFLOP/token (infer, executed)",
        "vs dense baseline",
        "tokens/s infer (median)",
        "tokens/s reference (median)",
    ]
    rows = [
        [
            r["model"],
            f"{r['params']:,}",
            f"{r['flops_per_token'] / 1e6:.3f}",
            f"{r['executed_vs_baseline']:.3f}",
            f"{r['tokens_per_s_infer']['median']:.0f}",
            f"{r['tokens_per_s_reference']['median']:.0f}",
        ]
        for r in table
    ]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    return experiment_main(__doc__, lambda ctx, _: ("efficiency", run(ctx), []), argv)


if __name__ == "__main__":
    raise SystemExit(main())
