"""Calibration: spectral-entropy percentiles of a frozen checkpoint -> CHIAR thresholds and bands.

As in the paper, a frozen (normally baseline) model reads calibration text through the reference
forward, which reports the spectral entropy H of every token at every layer (for both archs). For
each layer that is a routing layer in CHIAR (index 1 .. L-2, 0-based), the thresholds are
tau_l = (p33 + p67) / 2 and the three-operator bands are [p33, p67]. They are written into a copy
of a CHIAR train config (`template`) at `output`, ready for `python -m training train`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import CheckpointError, ChiarConfig, ChiarLM, load_checkpoint
from model.config import routing_layers
from model.device import resolve_device
from model.storage import atomic_write_text
from training.config import CalibrateConfig, TrainConfig, parse_config, read_config_file, write_config_file
from training.data import encode_documents, load_documents
from training.errors import TrainingError
from training.paths import check_path_usable


def load_frozen(path: str, device: torch.device, where: str = "checkpoint") -> tuple[Any, Any]:
    """load_checkpoint in float32 with a TrainingError that names the problem."""
    try:
        model, tokenizer = load_checkpoint(path, device=str(device), dtype=torch.float32)
    except CheckpointError as exc:
        raise TrainingError(f"{where}: {exc}") from None
    model.eval()
    return model, tokenizer


@torch.no_grad()
def collect_entropy(model: Any, ids: torch.Tensor, seq_len: int, batch_size: int, device: torch.device) -> np.ndarray:
    """Entropy [tokens, L] of every token of the stream `ids`, in windows of `seq_len`."""
    chunks = list(torch.split(ids, seq_len))
    rows: list[np.ndarray] = []
    for start in range(0, len(chunks), batch_size):
        group = chunks[start : start + batch_size]
        width = max(c.numel() for c in group)
        inp = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for r, c in enumerate(group):
            inp[r, : c.numel()] = c
            mask[r, : c.numel()] = 1
        out = model(inp.to(device), attention_mask=mask.to(device))
        ent = out.routing.entropy.float().cpu()  # [B, T, L]
        rows.append(ent[mask.bool()].numpy())
    return np.concatenate(rows, axis=0)


def percentiles(entropy: np.ndarray, n_layers: int) -> list[dict[str, float]]:
    """p33/p67/threshold per CHIAR routing layer (model.config.routing_layers of a CHIAR model this deep)."""
    layers = []
    for layer in routing_layers(n_layers):
        values = entropy[:, layer]
        values = values[~np.isnan(values)]
        if values.size == 0:
            raise TrainingError(f"checkpoint: the model reports no spectral entropy at layer {layer}; cannot calibrate")
        p33, p67 = (float(v) for v in np.percentile(values.astype(np.float64), [33.0, 67.0]))
        layers.append({
            "layer": layer, "p33": p33, "p67": p67, "threshold": (p33 + p67) / 2,
            "mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()), "tokens": int(values.size),
        })
    return layers


@torch.no_grad()
def calibrate_evenly(model: ChiarLM, ids: torch.Tensor) -> ChiarLM:
    """Put each routing layer's cut points at the entropy quantiles (k / (cuts + 1), the lower value) that
    split the tokens of `ids` [B, T] evenly between its operators, from one hard-gated forward.

    The one recipe for random-weight models in tests and benchmarks: every operator gets tokens.
    """
    entropy = model.infer(ids).routing.entropy
    for layer in model.config.routing_layers:
        router = model.blocks[layer].router
        values = entropy[..., layer].flatten()
        values = values[~values.isnan()].sort().values
        cuts = len(router.cut_points())
        router.set_cut_points([float(values[int(k / (cuts + 1) * (values.numel() - 1))]) for k in range(1, cuts + 1)])
    return model


def calibrated_random_model(config: ChiarConfig, ids: torch.Tensor, seed: int = 0) -> ChiarLM:
    """A model of `config` with weights seeded `seed`, calibrated evenly on `ids` (`calibrate_evenly`)."""
    torch.manual_seed(seed)
    return calibrate_evenly(ChiarLM(config).eval(), ids)


def calibrate(cfg: CalibrateConfig) -> dict[str, Any]:
    """Run the calibration and write the calibrated CHIAR config and the JSON report."""
    device = resolve_device(cfg.device)
    output = Path(cfg.output)
    report_path = Path(cfg.report) if cfg.report else output.with_name(output.stem + ".calibration.json")
    for p, where in ((output, "output"), (report_path, "report")):
        check_path_usable(p.parent, where)
    template = read_config_file(cfg.template)
    model_section = template.get("model")
    if not isinstance(model_section, dict):
        raise TrainingError(f"template: {cfg.template} has no model: section")
    if model_section.get("arch", "chiar") != "chiar":
        raise TrainingError(f"template: model.arch must be 'chiar' to take thresholds, got {model_section.get('arch')!r}")

    model, tokenizer = load_frozen(cfg.checkpoint, device)
    mc = model.config
    for name in ("n_layers", "d_model"):
        want = model_section.get(name, ChiarConfig.__dataclass_fields__[name].default)
        if want != getattr(mc, name):
            raise TrainingError(
                f"template: model.{name} is {want} but the calibrated checkpoint has {name}={getattr(mc, name)}; "
                "thresholds only transfer between models of the same depth and width"
            )
    if mc.n_layers < 3:
        raise TrainingError(f"checkpoint: {mc.n_layers} layers leave no routing layer to calibrate")

    docs = [d for i, src in enumerate(cfg.data) for d in load_documents(src, f"data[{i}] ({src.name})")]
    ids = encode_documents(tokenizer, docs, mc.bos_token_id, mc.eos_token_id)[: cfg.max_tokens]
    if ids.numel() < 2:
        raise TrainingError("data: the calibration text has fewer than 2 tokens")
    entropy = collect_entropy(model, ids, min(cfg.seq_len, mc.max_seq_len), cfg.batch_size, device)
    layers = percentiles(entropy, mc.n_layers)

    out = copy.deepcopy(template)
    out["model"]["thresholds"] = [round(x["threshold"], 6) for x in layers]
    out["model"]["bands"] = [[round(x["p33"], 6), round(x["p67"], 6)] for x in layers]
    extra = dict(out["model"].get("extra") or {})
    extra["calibration"] = {"checkpoint": str(cfg.checkpoint), "tokens": int(ids.numel()), "report": str(report_path)}
    out["model"]["extra"] = extra
    out.setdefault("tokenizer", {})
    if isinstance(out["tokenizer"], dict) and not out["tokenizer"].get("path"):
        out["tokenizer"]["path"] = str(cfg.checkpoint)  # share the calibrated model's tokenizer
    parse_config(TrainConfig, copy.deepcopy(out))  # the result must be a valid train config

    report = {
        "checkpoint": str(cfg.checkpoint), "arch": mc.arch, "n_layers": mc.n_layers, "tokens": int(ids.numel()),
        "template": str(cfg.template), "output": str(output), "layers": layers,
        "thresholds": out["model"]["thresholds"], "bands": out["model"]["bands"],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_config_file(out, output)
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    return report
