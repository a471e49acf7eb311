"""Perplexity of held-out text with sliding windows: token PPL, word PPL and bits per byte.

Same protocol as the server: a BOS token is prepended so every text token is predicted;
windows of `seq_len` tokens advance by `stride`, and each token is scored once, with the longest
context its window gives. token PPL = exp(NLL / tokens), word PPL = exp(NLL / whitespace words),
bits per byte = NLL / (ln 2 * UTF-8 bytes).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from model import Operator
from training.calibrate import load_frozen
from training.config import EVAL_PATHS, EvalConfig
from training.data import EvalText, load_documents
from training.distributed import resolve_device
from training.errors import TrainingError
from training.paths import check_path_usable

GATE_OPEN = 0.5  # the MetaRouter's hard gate: inference runs the DCT mix at layer 1 iff g >= 0.5


def windows(n_ids: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored position) over ids[0:n_ids]; position p predicts ids[p + 1]."""
    scored_until = 0  # positions < scored_until are done
    begin = 0
    while scored_until < n_ids - 1:
        end = min(begin + seq_len, n_ids)
        yield begin, end, scored_until
        scored_until = end - 1
        if end == n_ids:
            break
        begin = min(begin + stride, scored_until)  # the window must hold the next scored position


def _forward(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, path: str) -> Any:
    if path == "infer":
        return model.infer(input_ids, attention_mask=mask)
    return model(input_ids, attention_mask=mask, hard=True if path == "hard" else None)


@torch.no_grad()
def score_ids(
    model: Any, ids: list[int], seq_len: int, stride: int, batch_size: int, path: str = "reference",
    device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
) -> tuple[float, int, dict[str, Any]]:
    """Sum of NLL (nats) over ids[1:], the number of predicted tokens, and routing totals."""
    if path not in EVAL_PATHS:
        raise ValueError(f"path: must be one of {EVAL_PATHS}, got {path!r}")
    device = torch.device(device)
    spans = list(windows(len(ids), seq_len, stride))
    total_nll, total_tokens = 0.0, 0
    counts: torch.Tensor | None = None
    gate_sum, gate_open, gate_n = 0.0, 0, 0
    source = torch.tensor(ids, dtype=torch.long)
    for start in range(0, len(spans), batch_size):
        group = spans[start : start + batch_size]
        width = max(e - b for b, e, _ in group)
        inp = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        for row, (b, e, first) in enumerate(group):
            inp[row, : e - b] = source[b:e]
            mask[row, : e - b] = 1
            lo = first - b  # first position of this window that is scored
            labels[row, lo : e - b - 1] = source[first + 1 : e]
        inp, mask, labels = inp.to(device), mask.to(device), labels.to(device)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            out = _forward(model, inp, mask, path)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        valid = labels != -100
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total_nll -= float(picked[valid].sum())
        total_tokens += int(valid.sum())
        routing = out.routing
        c = routing.counts.detach().cpu().long()
        counts = c if counts is None else counts + c
        gate = routing.gate.detach().float().cpu()[mask.cpu().bool()]
        gate = gate[~torch.isnan(gate)]
        gate_sum += float(gate.sum())
        gate_open += int((gate >= GATE_OPEN).sum())
        gate_n += gate.numel()
    routing_stats = {
        "attention_share": attention_share(counts) if counts is not None else [],
        "operator_share": operator_shares(counts) if counts is not None else [],
        "gate": gate_sum / gate_n if gate_n else None,
        "gate_open": gate_open / gate_n if gate_n else None,
    }
    return total_nll, total_tokens, routing_stats


def attention_share(counts: torch.Tensor) -> list[float]:
    """Per layer: share of valid tokens routed to attention (operator 3) in a [L, 4] count table."""
    counts = counts.double()
    totals = counts.sum(-1).clamp(min=1)
    return [round(float(v), 6) for v in counts[:, 3] / totals]


def operator_shares(counts: torch.Tensor) -> list[dict[str, float]]:
    """Per layer: share of valid tokens per operator name (identity, dct, rbf, attention)."""
    counts = counts.double()
    totals = counts.sum(-1).clamp(min=1)
    return [{op.label: round(float(counts[layer, op] / totals[layer]), 6) for op in Operator}
            for layer in range(counts.shape[0])]


def metrics(nll: float, tokens: int, words: int, n_bytes: int) -> dict[str, float]:
    """token PPL, word PPL and bits per byte from a summed NLL."""
    return {
        "token_ppl": math.exp(nll / max(tokens, 1)),
        "word_ppl": math.exp(nll / max(words, 1)),
        "bits_per_byte": nll / (math.log(2) * max(n_bytes, 1)),
        "nll": nll,
        "tokens": tokens,
        "words": words,
        "bytes": n_bytes,
    }


def evaluate_texts(
    model: Any, tokenizer: Tokenizer, texts: list[EvalText], seq_len: int, stride: int, batch_size: int,
    path: str = "reference", device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics (plus routing stats) for each text, keyed by name."""
    bos = model.config.bos_token_id
    results: dict[str, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    try:
        for t in texts:
            ids = [bos, *tokenizer.encode(t.text, add_special_tokens=False).ids]
            nll, n, routing = score_ids(model, ids, seq_len, stride, batch_size, path, device, autocast_dtype)
            results[t.name] = {**metrics(nll, n, t.words, t.bytes), **routing}
    finally:
        model.train(was_training)
    return results


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """The `eval` command: every source through every forward path of one checkpoint."""
    device = resolve_device(cfg.device)
    if cfg.output:
        check_path_usable(Path(cfg.output).parent, "output")
    texts = [
        EvalText(src.name, "".join(load_documents(src, f"data[{i}] ({src.name})")))
        for i, src in enumerate(cfg.data)
    ]
    model, tokenizer = load_frozen(cfg.checkpoint, device)
    max_len = model.config.max_seq_len
    seq_len = cfg.seq_len or max_len
    if seq_len > max_len:
        raise TrainingError(f"seq_len: {seq_len} exceeds the checkpoint's max_seq_len ({max_len})")
    stride = cfg.stride or max(seq_len // 2, 1)
    if stride > seq_len:
        raise TrainingError(f"stride: {stride} exceeds seq_len ({seq_len})")
    amp = torch.bfloat16 if device.type == "cuda" else None
    results = {
        path: evaluate_texts(model, tokenizer, texts, seq_len, stride, cfg.batch_size, path, device, amp)
        for path in cfg.paths
    }
    report = {
        "checkpoint": str(cfg.checkpoint), "arch": model.config.arch, "params": model.num_parameters(),
        "seq_len": seq_len, "stride": stride, "device": str(device), "results": results,
    }
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        tmp.replace(out)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A plain table of an eval report."""
    lines = [
        f"checkpoint {report['checkpoint']} ({report['arch']}, {report['params']:,} parameters), "
        f"window {report['seq_len']}, stride {report['stride']}",
        f"{'path':<10} {'source':<20} {'token PPL':>10} {'word PPL':>10} {'bits/byte':>10} {'attn share':>10} {'gate':>6}",
    ]
    for path, sets in report["results"].items():
        for name, m in sets.items():
            share = m["attention_share"]
            routed = share[1:-1] if report["arch"] == "chiar" and len(share) > 2 else share
            mean_share = sum(routed) / max(len(routed), 1)
            gate = "-" if m["gate"] is None else f"{m['gate']:.2f}"
            lines.append(
                f"{path:<10} {name:<20} {m['token_ppl']:>10.2f} {m['word_ppl']:>10.2f} {m['bits_per_byte']:>10.4f} "
                f"{mean_share:>10.3f} {gate:>6}"
            )
    return "\n".join(lines)
