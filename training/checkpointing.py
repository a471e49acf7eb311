"""Atomic, resumable training checkpoints (safetensors + JSON, no pickle).

A checkpoint directory is the model checkpoint written by `model.save_checkpoint` (config.json,
model.safetensors, tokenizer.json) plus `training_state.safetensors` (optimizer moments, torch RNG
states, full-precision master weights when the model stores a lossy weights_dtype) and
`training_state.json` (step, schedule, data position, optimizer hyper-parameters, Python RNG, best
validation PPL). Directories are built by `model.storage.atomic_directory` (a staging name renamed
into place), so a killed run leaves either the old or the new checkpoint, never a partial one, and
a failed write (disk full, file-size limit, read-only directory) raises a CheckpointError naming
the path while the previous checkpoint stays intact.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from model import CheckpointError, ChiarConfig, ChiarLM, ConfigError, load_checkpoint
from model.checkpoint import write_checkpoint_files
from model.storage import atomic_directory, clean_stale
from training.errors import TrainingError

__all__ = ["atomic_directory", "clean_stale"]  # re-exported: the one writer lives in model.storage

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_FORMAT = "chiar-training-state"
STATE_VERSION = 1


# ---------------------------------------------------------------------------- state <-> tensors + JSON
def optimizer_to_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_to_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def rng_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------- write / read
def _write_file(path: Path, write: Any) -> None:
    """Run write(path); a failure (OSError, safetensors' "File too large") names the path."""
    try:
        write(path)
    except CheckpointError:
        raise
    except Exception as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc).strip() or type(exc).__name__)
        raise CheckpointError(path, f"cannot write checkpoint file: {reason.splitlines()[0]}") from exc


def _atomic_write(path: Path, write: Any) -> None:
    """write(staging) inside one atomic directory; directory-level failures name the directory."""
    try:
        with atomic_directory(path) as staging:
            try:
                write(staging)
            except CheckpointError as exc:
                raise exc.relocated(staging, path) from exc.__cause__
    except CheckpointError:
        raise
    except OSError as exc:  # mkdir of the parent, the staging rename, the final rename
        where = Path(exc.filename) if exc.filename else path
        raise CheckpointError(where, f"cannot write checkpoint directory: {exc.strerror or exc}") from exc


def save_training_checkpoint(
    path: Path, model: ChiarLM, tokenizer: Tokenizer, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Write model checkpoint + training state atomically at `path`."""
    tensors, opt_meta = optimizer_to_state(optimizer)
    rng_tensors, rng_meta = rng_to_state()
    tensors.update(rng_tensors)
    lossy = model.config.weights_dtype != "float32"
    if lossy:  # the model file is rounded; keep the exact weights for resuming
        for name, value in model.state_dict().items():
            tensors[f"master.{name}"] = value.detach().cpu().clone().contiguous()
    meta = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "arch": model.config.arch,
        "master_weights": lossy,
        "optimizer": opt_meta,
        "rng": rng_meta,
        **state,
    }
    def write(staging: Path) -> None:
        write_checkpoint_files(model, tokenizer, staging)
        _write_file(staging / STATE_TENSORS, lambda p: save_file(tensors, str(p), metadata={"format": STATE_FORMAT}))
        _write_file(staging / STATE_JSON, lambda p: p.write_text(json.dumps(meta, indent=1), encoding="utf-8"))

    _atomic_write(path, write)


def save_model_only(path: Path, model: ChiarLM, tokenizer: Tokenizer, extra_files: dict[str, str] | None = None) -> None:
    """Atomically write a model checkpoint (plus small JSON side files) at `path`."""
    def write(staging: Path) -> None:
        write_checkpoint_files(model, tokenizer, staging)
        for name, text in (extra_files or {}).items():
            _write_file(staging / name, lambda p, text=text: p.write_text(text, encoding="utf-8"))

    _atomic_write(path, write)


MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "metrics.json")


def copy_checkpoint(src: Path, dst: Path, names: tuple[str, ...] = MODEL_FILES) -> None:
    """Atomically copy the model files of a checkpoint directory (no training state)."""
    def write(staging: Path) -> None:
        _write_file(staging, lambda p: p.mkdir())
        for name in names:
            if (src / name).exists():
                _write_file(staging / name, lambda p, name=name: shutil.copyfile(src / name, p))

    _atomic_write(dst, write)


def read_checkpoint_config(path: Path, where: str = "resume") -> ChiarConfig:
    """The ChiarConfig stored in a checkpoint directory, with a clear error when it is unusable."""
    cfg_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise TrainingError(f"{where}: checkpoint directory not found: {path}")
    try:
        return ChiarConfig.from_json(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{where}: {cfg_file} is missing; not a checkpoint directory") from None
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"{where}: {cfg_file}: {exc}") from None


_ARCH_FIELDS = ("arch", "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "operators", "metarouter", "tie_embeddings", "rbf_centers")


def check_compatible(saved: ChiarConfig, wanted: ChiarConfig, path: Path) -> None:
    """Refuse to resume a checkpoint whose architecture differs from the config's."""
    if saved.arch != wanted.arch:
        raise TrainingError(
            f"resume: checkpoint {path} is arch {saved.arch!r} but model.arch is {wanted.arch!r}; "
            "a run can only resume from a checkpoint of the same architecture (use a new out_dir)"
        )
    diffs = [f"{f} ({getattr(saved, f)!r} vs {getattr(wanted, f)!r})" for f in _ARCH_FIELDS if getattr(saved, f) != getattr(wanted, f)]
    if diffs:
        raise TrainingError(f"resume: checkpoint {path} does not match the model config: " + ", ".join(diffs))


def check_resumable(path: Path, wanted: ChiarConfig) -> None:
    """A same-architecture checkpoint directory that carries training state, or a TrainingError."""
    check_compatible(read_checkpoint_config(path), wanted, path)
    if not (path / STATE_JSON).is_file() or not (path / STATE_TENSORS).is_file():
        raise TrainingError(f"resume: {path} is a model checkpoint without training state ({STATE_JSON}); cannot resume from it")


def load_training_checkpoint(path: Path, model: ChiarLM, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from `path` into live objects; return the JSON state."""
    path = Path(path)
    check_resumable(path, model.config)
    state_json, state_file = path / STATE_JSON, path / STATE_TENSORS
    try:
        meta = json.loads(state_json.read_text(encoding="utf-8"))
        tensors = load_file(str(state_file))
    except (OSError, ValueError, RuntimeError) as exc:
        raise TrainingError(f"resume: cannot read the training state in {path}: {exc}") from None
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise TrainingError(f"resume: {state_json} has unknown format {meta.get('format')!r} v{meta.get('version')!r}")
    if meta["master_weights"]:
        weights = {k[len("master.") :]: v for k, v in tensors.items() if k.startswith("master.")}
    else:
        try:
            loaded, _ = load_checkpoint(path)
        except CheckpointError as exc:
            raise TrainingError(f"resume: {exc}") from None
        weights = loaded.state_dict()
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise TrainingError(f"resume: weights in {path} do not fit the model: {exc}") from None
    optimizer.load_state_dict(optimizer_from_state(tensors, meta["optimizer"]))
    rng_from_state(tensors, meta["rng"])
    return meta


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the finished step checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE_JSON).exists():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def prune_checkpoints(directory: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints."""
    for _, p in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
