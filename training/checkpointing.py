"""Atomic, resumable training checkpoints (safetensors + JSON, no pickle).

A checkpoint directory is the model checkpoint written by `model.save_checkpoint` (config.json,
model.safetensors, tokenizer.json) plus `training_state.safetensors` (optimizer moments, torch RNG
states, full-precision master weights when the model stores a lossy weights_dtype) and
`training_state.json` (step, schedule, data position, optimizer hyper-parameters, Python RNG, best
validation PPL). Directories are built under a temporary name and renamed into place, so a killed
run leaves either the old or the new checkpoint, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from model import CheckpointError, ChiarConfig, ChiarLM, ConfigError, load_checkpoint, save_checkpoint
from training.errors import TrainingError

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_FORMAT = "chiar-training-state"
STATE_VERSION = 1
_TMP, _OLD = ".tmp-", ".old-"


# ---------------------------------------------------------------------------- atomic directories
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh staging path (not yet created); on success it replaces `final` atomically."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f"{_TMP}{final.name}-{os.getpid()}"
    old = final.parent / f"{_OLD}{final.name}-{os.getpid()}"
    for stale in (staging, old):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        yield staging
        if not staging.is_dir():
            raise RuntimeError(f"nothing was written to {staging}")
        _fsync_tree(staging)
        if final.exists():
            os.rename(final, old)
        os.rename(staging, final)
        _fsync_dir(final.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and final.exists():
            shutil.rmtree(old, ignore_errors=True)


def clean_stale(directory: Path, name: str | None = None) -> None:
    """Remove staging leftovers of killed runs (ours and save_checkpoint's); restore a directory
    caught mid-replacement. With `name`, only leftovers of that entry are touched."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        n = p.name
        if not n.startswith("."):
            continue
        if n.startswith(_TMP):
            kind, target = "tmp", n[len(_TMP) :].rsplit("-", 1)[0]
        elif n.startswith(_OLD):
            kind, target = "old", n[len(_OLD) :].rsplit("-", 1)[0]
        elif ".tmp-" in n:
            kind, target = "tmp", n[1:].rsplit(".tmp-", 1)[0]
        elif ".old-" in n:
            kind, target = "old", n[1:].rsplit(".old-", 1)[0]
        else:
            continue
        if name is not None and target != name:
            continue
        if kind == "old" and not (directory / target).exists():
            os.rename(p, directory / target)
        else:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


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
    with atomic_directory(path) as staging:
        save_checkpoint(model, tokenizer, staging)
        save_file(tensors, str(staging / STATE_TENSORS), metadata={"format": STATE_FORMAT})
        (staging / STATE_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def save_model_only(path: Path, model: ChiarLM, tokenizer: Tokenizer, extra_files: dict[str, str] | None = None) -> None:
    """Atomically write a model checkpoint (plus small JSON side files) at `path`."""
    with atomic_directory(path) as staging:
        save_checkpoint(model, tokenizer, staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")


def copy_checkpoint(src: Path, dst: Path, names: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json", "metrics.json")) -> None:
    """Atomically copy the model files of a checkpoint directory (no training state)."""
    with atomic_directory(dst) as staging:
        staging.mkdir()
        for name in names:
            if (src / name).exists():
                shutil.copyfile(src / name, staging / name)


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
