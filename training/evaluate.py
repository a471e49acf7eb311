"""Perplexity of held-out text with sliding windows: token PPL, word PPL and bits per byte.

Same protocol as the server, from the same code (model/scoring.py): a BOS token is prepended so
every text token is predicted; windows of `seq_len` input tokens advance by `stride`, and each token
is scored once, with the longest context its window gives. token PPL = exp(NLL / tokens), word PPL =
exp(NLL / whitespace words), bits per byte = NLL / (ln 2 * UTF-8 bytes).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from model import Operator
from model.accounting import attention_share
from model.config import routing_layers
from model.device import resolve_device
from model.routing import GATE_OPEN
from model.scoring import Perplexity, plan_windows, right_pad, total_nll
from model.storage import atomic_write_text
from training.calibrate import load_frozen
from training.config import EVAL_PATHS, EvalConfig
from training.data import EvalText, load_documents
from training.errors import TrainingError
from training.paths import check_path_usable


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
    spans = plan_windows(len(ids), seq_len, stride)
    logprobs: list[float] = []
    counts: torch.Tensor | None = None
    gate_sum, gate_open, gate_n = 0.0, 0, 0
    source = torch.tensor(ids, dtype=torch.long)
    for start in range(0, len(spans), batch_size):
        group = spans[start : start + batch_size]
        inp, mask = right_pad([ids[s.begin : s.end] for s in group])
        labels = torch.full_like(inp, -100)
        for row, s in enumerate(group):  # input position p predicts ids[p + 1]; only targets >= score_from count
            labels[row, s.score_from - 1 - s.begin : s.length] = source[s.score_from : s.end + 1]
        inp, mask, labels = inp.to(device), mask.to(device), labels.to(device)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            out = _forward(model, inp, mask, path)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        valid = labels != -100
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logprobs += picked[valid].tolist()
        routing = out.routing
        c = routing.counts.detach().cpu().long()
        counts = c if counts is None else counts + c
        gate = routing.gate.detach().float().cpu()[mask.cpu().bool()]
        gate = gate[~torch.isnan(gate)]
        gate_sum += float(gate.sum())
        gate_open += int((gate >= GATE_OPEN).sum())
        gate_n += gate.numel()
    routing_stats = {
        "attention_share": attention_shares(counts) if counts is not None else [],
        "operator_share": operator_shares(counts) if counts is not None else [],
        "gate": gate_sum / gate_n if gate_n else None,
        "gate_open": gate_open / gate_n if gate_n else None,
    }
    return total_nll(logprobs), len(logprobs), routing_stats


def attention_shares(counts: torch.Tensor) -> list[float]:
    """Per layer: share of valid tokens routed to attention in a [layer, operator] count table (0 without tokens)."""
    return [round(attention_share(counts, [layer]) or 0.0, 6) for layer in range(counts.shape[0])]


def mean_routed_share(shares: list[float], arch: str) -> float:
    """The mean of per-layer attention shares over the routing layers (every layer of the baseline)."""
    layers = routing_layers(len(shares), arch) or range(len(shares))
    return sum(shares[layer] for layer in layers) / max(len(layers), 1)


def operator_shares(counts: torch.Tensor) -> list[dict[str, float]]:
    """Per layer: share of valid tokens per operator name (identity, dct, rbf, attention)."""
    counts = counts.double()
    totals = counts.sum(-1).clamp(min=1)
    return [{op.label: round(float(counts[layer, op] / totals[layer]), 6) for op in Operator}
            for layer in range(counts.shape[0])]


def metrics(p: Perplexity) -> dict[str, float | None]:
    """token PPL, word PPL and bits per byte (model.scoring.Perplexity) as report fields."""
    return {"token_ppl": p.token_ppl, "word_ppl": p.word_ppl, "bits_per_byte": p.bits_per_byte,
            "nll": p.nll, "tokens": p.tokens, "words": p.words, "bytes": p.bytes}


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
            results[t.name] = {**metrics(Perplexity.of_text(t.text, nll, n)), **routing}
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
        atomic_write_text(Path(cfg.output), json.dumps(report, indent=2) + "\n")
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
            mean_share = mean_routed_share(m["attention_share"], report["arch"])
            lines.append(
                f"{path:<10} {name:<20} {_num(m['token_ppl'], '.2f'):>10} {_num(m['word_ppl'], '.2f'):>10} "
                f"{_num(m['bits_per_byte'], '.4f'):>10} {mean_share:>10.3f} {_num(m['gate'], '.2f'):>6}"
            )
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
