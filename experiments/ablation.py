"""Ablation (paper Sec. 5.2): baseline vs CHIAR soft / ste / threshold / threshold_reg.

Protocol: train the full-attention baseline on WikiText-2 valid (last 5% held out for validation),
calibrate tau_l = (p33 + p67) / 2 per routing layer on the frozen baseline, train the four CHIAR
variants from those thresholds with the same tokenizer, data, steps and seed; score the held-out
validation text and WikiText-2 test with the training-mode (reference) forward and, for CHIAR,
with the hard-gated inference path `model.infer` (the soft-vs-hard gap).

    python -m experiments.ablation --size cpu [--seeds 0 1 2] [--publish]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.cli import Context, experiment_main, log, markdown_table
from experiments.common import (
    best_checkpoint,
    eval_texts,
    mean_std,
    score,
    test_source,
)
from experiments.recipes import baseline, calibration, chiar_variant

PAPER_TEST_PPL = {"baseline": 44.63, "soft": 45.62, "ste": 45.67, "threshold": 48.34, "threshold_reg": 48.45}


def _row(ctx: Context, cfg: dict[str, Any], done: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    texts = eval_texts(cfg, [test_source(ctx.size)])
    ckpt = best_checkpoint(Path(cfg["out_dir"]))
    scores = score(ckpt, texts, ctx.size.seq_len, paths, ctx.device)
    row: dict[str, Any] = {"run": cfg["out_dir"], "checkpoint": str(ckpt), "params": done["params"],
                           "train_seconds": round(done["seconds"], 1), "best_step": done["best"]["step"]}
    for path, sets in scores.items():
        row[path] = {
            name: {"token_ppl": m["token_ppl"], "word_ppl": m["word_ppl"], "bits_per_byte": m["bits_per_byte"],
                   "tokens": m["tokens"], "attention_share": m["attention_share"], "gate": m["gate"]}
            for name, m in sets.items()
        }
    return row


def run(ctx: Context) -> dict[str, Any]:
    per_seed: dict[str, list[dict[str, Any]]] = {"baseline": [], **{m: [] for m in ctx.modes}}
    calibrations = {}
    for seed in ctx.seeds:
        cfg, done, _ = baseline(ctx, seed)
        log(f"score baseline seed {seed}")
        per_seed["baseline"].append(_row(ctx, cfg, done, ("reference",)))
        calibrations[seed] = calibration(ctx, seed)
        for mode in ctx.modes:
            cfg, done = chiar_variant(ctx, seed, mode)
            log(f"score {mode} seed {seed}")
            per_seed[mode].append(_row(ctx, cfg, done, ("reference", "infer")))

    table = []
    for name, rows in per_seed.items():
        entry: dict[str, Any] = {"model": name, "params": rows[0]["params"], "paper_test_ppl": PAPER_TEST_PPL[name],
                                 "val_ppl": mean_std([r["reference"]["wikitext2"]["token_ppl"] for r in rows]),
                                 "test_ppl": mean_std([r["reference"]["wikitext2-test"]["token_ppl"] for r in rows])}
        if "infer" in rows[0]:
            entry["test_ppl_infer"] = mean_std([r["infer"]["wikitext2-test"]["token_ppl"] for r in rows])
            entry["val_ppl_infer"] = mean_std([r["infer"]["wikitext2"]["token_ppl"] for r in rows])
            gaps = [r["infer"]["wikitext2-test"]["token_ppl"] - r["reference"]["wikitext2-test"]["token_ppl"] for r in rows]
            entry["hard_gap"] = mean_std(gaps)
            shares = [r["infer"]["wikitext2-test"]["attention_share"] for r in rows]
            entry["attention_share_infer"] = [sum(s[i] for s in shares) / len(shares) for i in range(len(shares[0]))]
            entry["gate_infer"] = rows[0]["infer"]["wikitext2-test"]["gate"]
        table.append(entry)
    base = table[0]["test_ppl"]["mean"]
    for entry in table:
        entry["test_ppl_vs_baseline"] = entry["test_ppl"]["mean"] / base
    result = {"table": table, "runs": per_seed,
              "calibration": {s: {"thresholds": c["thresholds"], "bands": c["bands"], "layers": c["layers"]}
                              for s, c in calibrations.items()}}
    print(format_table(table))
    return result


def format_table(table: list[dict[str, Any]]) -> str:
    def fmt(ms: dict[str, Any] | None) -> str:
        if ms is None:
            return "-"
        return f"{ms['mean']:.2f}" + (f" ± {ms['std']:.2f}" if ms.get("std") is not None else "")

    header = ["model", "params", "val PPL", "test PPL", "test PPL (infer, hard)", "hard - train-mode", "paper test PPL (16M)"]
    rows = [[e["model"], f"{e['params']:,}", fmt(e["val_ppl"]), fmt(e["test_ppl"]), fmt(e.get("test_ppl_infer")),
             fmt(e.get("hard_gap")), str(e["paper_test_ppl"])] for e in table]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    return experiment_main(__doc__, lambda ctx, _: ("ablation", run(ctx), []), argv)


if __name__ == "__main__":
    raise SystemExit(main())
