"""Mixed-dataset training (paper Sec. 5.4): WikiText-2 + tiny Shakespeare + ListOps vs WikiText-2 alone.

Both models are the ablation's `threshold_reg` CHIAR recipe (same size, tokenizer, calibrated
thresholds, steps and seed); the single-source model *is* the ablation row (reused when cached).
The mixed model samples each micro-batch from one source by weight (WikiText-2 0.5, Shakespeare
0.25, ListOps 0.25). Reported: per-source token PPL (training-mode and hard-gated inference path)
on each source's held-out tail, ListOps final-answer accuracy (argmax over the ten digits after
``=``), and the MetaRouter gate per source: its trajectory over training (from the training log)
and, at the end, its mean and the share of tokens whose hard gate opens (g >= 0.5).

    python -m experiments.mixed --size cpu [--publish]
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.cli import Context, experiment_main, log
from experiments.common import (
    best_checkpoint,
    ensure_trained,
    eval_texts,
    resolve,
    routing_profile,
    score,
    test_source,
    wiki_sources,
)
from experiments.recipes import calibration, chiar_config, chiar_variant
from model.accounting import attention_share
from model.routing import GATE_OPEN
from training.calibrate import load_frozen
from training.plots import plot_gate_by_source, read_log

ROUTING = "threshold_reg"


def mixed_sources(ctx: Context) -> list[dict[str, Any]]:
    s = ctx.size
    shakespeare: dict[str, Any] = {"name": "shakespeare", "corpus": "tinyshakespeare", "weight": 0.25, "holdout": 0.05}
    if s.train_max_bytes:
        shakespeare["max_bytes"] = s.train_max_bytes
    listops = {"name": "listops", "weight": 0.25, "holdout": 0.05,
               "listops": {"num_examples": s.listops_examples, "seed": 0, "max_depth": 3, "max_args": 5,
                           "max_length": s.listops_max_length}}
    wiki = {**wiki_sources(s)[0], "weight": 0.5}
    return [wiki, shakespeare, listops]


@torch.no_grad()
def _logprobs(model: Any, rows: list[list[int]], device: torch.device, path: str) -> list[torch.Tensor]:
    """Log-softmax over the vocabulary at every position of each (right-padded) row."""
    width = max(len(r) for r in rows)
    inp = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        inp[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    inp, mask = inp.to(device), mask.to(device)
    out = model.infer(inp, attention_mask=mask) if path == "infer" else model(inp, attention_mask=mask)
    logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
    return [logp[i, : len(r)] for i, r in enumerate(rows)]


@torch.no_grad()
def listops_accuracy(model: Any, tok: Any, text: str, limit: int, seq_len: int, device: torch.device,
                     path: str = "infer") -> dict[str, Any]:
    """Final-answer accuracy on held-out `expr = d` lines.

    The prediction is the digit d whose continuation `" d"` after `"expr ="` has the highest
    log-probability (one forward per example when every digit is a single token, else the ten
    continuations are scored).
    """
    examples: list[tuple[list[int], list[list[int]], int]] = []
    for line in text.splitlines():
        expr, sep, ans = line.rpartition(" = ")
        if not sep or not ans.strip().isdigit():
            continue
        prefix = [1, *tok.encode(expr + " =", add_special_tokens=False).ids]
        conts = []
        for d in range(10):
            full = [1, *tok.encode(f"{expr} = {d}", add_special_tokens=False).ids]
            if full[: len(prefix)] != prefix:
                break
            conts.append(full[len(prefix) :])
        if len(conts) != 10 or len(prefix) + max(map(len, conts)) > seq_len:
            continue
        examples.append((prefix, conts, int(ans)))
        if len(examples) >= limit:
            break
    if not examples:
        return {"accuracy": None, "examples": 0}
    preds: list[int] = []
    single = all(len(c) == 1 for _, conts, _ in examples for c in conts)
    for start in range(0, len(examples), 16 if single else 2):
        group = examples[start : start + (16 if single else 2)]
        if single:
            rows = [p for p, _, _ in group]
            for (_, conts, _), lp in zip(group, _logprobs(model, rows, device, path)):
                preds.append(int(torch.stack([lp[-1, c[0]] for c in conts]).argmax()))
        else:
            rows = [p + c for p, conts, _ in group for c in conts]
            lps = _logprobs(model, rows, device, path)
            for k, (p, conts, _) in enumerate(group):
                totals = []
                for d, c in enumerate(conts):
                    lp = lps[k * 10 + d]
                    totals.append(sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c)))
                preds.append(int(np.argmax(totals)))
    answers = [a for _, _, a in examples]
    correct = sum(int(p == a) for p, a in zip(preds, answers))
    majority = Counter(answers).most_common(1)[0]
    return {"accuracy": correct / len(examples), "examples": len(examples), "single_token_digits": single,
            "majority_class": majority[0], "majority_accuracy": majority[1] / len(examples),
            "predicted_distribution": dict(sorted(Counter(preds).items()))}


def _model_report(ctx: Context, label: str, cfg: dict[str, Any], texts: list[Any]) -> dict[str, Any]:
    ckpt = best_checkpoint(Path(cfg["out_dir"]))
    log(f"score {label} ({ckpt})")
    scores = score(ckpt, texts, ctx.size.seq_len, ("reference", "infer"), ctx.device)
    device = resolve(ctx.device)
    model, tok = load_frozen(str(ckpt), device)
    report: dict[str, Any] = {"checkpoint": str(ckpt), "ppl": {}, "gate": {}}
    for path, sets in scores.items():
        report["ppl"][path] = {name: m["token_ppl"] for name, m in sets.items()}
    windows = 16 if ctx.size.name != "tiny" else 2
    for t in texts:
        ids = [1, *tok.encode(t.text, add_special_tokens=False).ids]
        prof = routing_profile(model, ids, ctx.size.seq_len, "infer", windows, device=device)
        g = prof["gate"][~np.isnan(prof["gate"])]
        share = attention_share(prof["counts"], model.config.routing_layers) or 0.0
        report["gate"][t.name] = {"mean": float(g.mean()), "open_share": float((g >= GATE_OPEN).mean()),
                                  "attention_share_routing_layers": share}
    listops = next(t for t in texts if t.name == "listops")
    report["listops_accuracy"] = {
        path: listops_accuracy(model, tok, listops.text, ctx.size.listops_eval, ctx.size.seq_len, device, path)
        for path in ("reference", "infer")
    }
    return report


def run(ctx: Context) -> tuple[dict[str, Any], list[Path]]:
    seed = ctx.seeds[0]
    single_cfg, _ = chiar_variant(ctx, seed, ROUTING)
    cal = calibration(ctx, seed)
    mixed_cfg = chiar_config(ctx, seed, ROUTING, cal["thresholds"], name=f"mixed-{ROUTING}-s{seed}",
                             data=mixed_sources(ctx), best_source="wikitext2")
    ensure_trained(mixed_cfg)
    # every held-out tail of the mixed sources, plus WikiText-2 test, scores both models
    texts = eval_texts(mixed_cfg, [test_source(ctx.size)])
    result: dict[str, Any] = {"routing": ROUTING, "weights": {s["name"]: s["weight"] for s in mixed_cfg["data"]},
                              "single": _model_report(ctx, "single", single_cfg, texts),
                              "mixed": _model_report(ctx, "mixed", mixed_cfg, texts)}
    train_recs, _ = read_log(Path(mixed_cfg["out_dir"]))
    result["gate_trajectory"] = {
        "mixed": [[r["step"], r["gate_by_source"]] for r in train_recs],
        "single": [[r["step"], r["gate_by_source"]] for r in read_log(Path(single_cfg["out_dir"]))[0]],
    }
    result["sources_per_step"] = dict(Counter(s for r in train_recs for s in r["sources"]))
    figures = []
    fig = plot_gate_by_source(mixed_cfg["out_dir"], "mixed", ctx.root / "mixed_gate_by_source.png")
    if fig is not None:
        figures.append(fig)
    result["mixed_config"] = copy.deepcopy(mixed_cfg)
    print(json.dumps({k: result[k]["ppl"] for k in ("single", "mixed")}, indent=1))
    return result, figures


def main(argv: list[str] | None = None) -> int:
    return experiment_main(__doc__, lambda ctx, _: ("mixed", *run(ctx)), argv)


if __name__ == "__main__":
    raise SystemExit(main())
