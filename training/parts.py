"""The training loop's small pieces: the learning-rate schedule, parameter groups, autocast, the
tokenizer file checks, the weights digest and the JSONL run log."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from training.errors import TrainingError


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `min_lr` at `max_steps` (a pure function of step)."""

    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.max_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); not biases, norms, filters, router scalars."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def load_tokenizer(path: str | Path, where: str) -> Tokenizer:
    """A tokenizer.json file, or the tokenizer.json of a checkpoint directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise TrainingError(f"{where}: tokenizer file not found: {p}")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise TrainingError(f"{where}: {p} is not a valid tokenizer.json: {exc}") from None
    return tok


def check_special_ids(tok: Tokenizer, cfg: Any, where: str) -> None:
    wanted = {"<pad>": cfg.pad_token_id, "<bos>": cfg.bos_token_id, "<eos>": cfg.eos_token_id}
    for token, tid in wanted.items():
        if tok.token_to_id(token) != tid:
            raise TrainingError(f"{where}: tokenizer maps {token} to {tok.token_to_id(token)}, model expects {tid}")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class JsonlLog:
    """Append-only JSONL log (rank 0), flushed per record; `truncate` drops records past a step."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self._fh = None

    def truncate(self, max_step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if rec.get("step", 0) <= max_step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
