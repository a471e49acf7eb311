"""Checkpoint directories: config.json + model.safetensors + tokenizer.json. No pickle anywhere.

Writes go through `model.storage.atomic_directory` (a staging sibling renamed into place), so a
crash never leaves a half-written checkpoint under the target name. Loads check the config against
the safetensors header (`model.checkpoint_guard`) before a single weight is allocated.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from .checkpoint_files import check_hf_files
from .checkpoint_guard import GuardError, check_finite, check_limits, check_sizes, check_tensors, read_header
from .chiar import ChiarLM
from .config import ChiarConfig, ConfigError
from .hf_tokenizer import TOKENIZER_CONFIG, write_tokenizer_files
from .storage import TORCH_DTYPES, atomic_directory

FORMAT_VERSION = "1"
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
MAX_CONFIG_BYTES = 2**20  # config.json is a few KB; refuse to parse anything absurd
MAX_TOKENIZER_BYTES = 2**28


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded or saved; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem

    def relocated(self, staging: Path, final: Path) -> CheckpointError:
        """The same error naming the path under `final` instead of its staging twin."""
        if self.path == staging or staging in self.path.parents:
            return CheckpointError(final / self.path.relative_to(staging), self.problem)
        return self


def _unique_state(model: ChiarLM) -> dict[str, torch.Tensor]:
    """State dict without the tied lm_head alias (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _why(exc: BaseException) -> str:
    """A one-line reason for a failed write (OSError strerror, or the library's message)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def write_checkpoint_files(model: ChiarLM, tokenizer: Tokenizer, directory: Path) -> None:
    """Write the three checkpoint files into `directory` (created; the caller makes it atomic).

    Any failed write (disk full, file-size limit, read-only directory) becomes a CheckpointError
    naming the file being written.
    """
    config = model.config
    if config.arch == "chiar":
        config = config.replace(thresholds=model.routing_thresholds(), bands=model.routing_bands() or config.bands)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(
            directory / TOKENIZER_FILE, f"tokenizer has {tokenizer.get_vocab_size()} tokens but vocab_size is {config.vocab_size}"
        )
    dtype = TORCH_DTYPES[config.weights_dtype]
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in _unique_state(model).items()}
    target = directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / CONFIG_FILE
        target.write_text(config.to_json())
        target = directory / WEIGHTS_FILE
        save_file(tensors, str(target), metadata={"format_version": FORMAT_VERSION, "arch": config.arch})
        target = directory / TOKENIZER_FILE
        tokenizer.save(str(target))
        # tokenizer_config.json + special_tokens_map.json: AutoTokenizer (lm-eval, HF clients) loads
        # every checkpoint we write, the training export included
        target = directory / TOKENIZER_CONFIG
        write_tokenizer_files(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
            target = directory / name
            with open(target, "rb") as f:
                os.fsync(f.fileno())
    except CheckpointError:
        raise
    except Exception as exc:  # OSError, SafetensorError ("File too large"), tokenizers' plain Exception
        raise CheckpointError(target, f"cannot write checkpoint file: {_why(exc)}") from exc


def save_checkpoint(model: ChiarLM, tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write the checkpoint directory atomically; config thresholds follow the model's routers."""
    path = Path(path)
    try:
        with atomic_directory(path) as staging:
            try:
                write_checkpoint_files(model, tokenizer, staging)
            except CheckpointError as exc:
                raise exc.relocated(staging, path) from exc.__cause__
    except CheckpointError:
        raise
    except OSError as exc:  # the parent cannot be created, or a rename failed
        raise CheckpointError(Path(exc.filename) if exc.filename else path, f"cannot write checkpoint directory: {_why(exc)}") from exc
    return path


def _regular_file(path: Path) -> None:
    """Refuse FIFOs, devices, directories and dangling links with a precise message."""
    if path.is_symlink() and not path.exists():
        raise CheckpointError(path, "dangling or looping symlink")
    if not path.exists():
        raise CheckpointError(path, "missing file")
    if not path.is_file():
        raise CheckpointError(path, "not a regular file (a FIFO, device or directory)")


def _read_text(path: Path, limit: int) -> str:
    size = path.stat().st_size
    if size > limit:
        raise CheckpointError(path, f"{size} bytes, over the {limit}-byte limit for this file")
    return path.read_text(encoding="utf-8")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[ChiarLM, Tokenizer]:
    """Load (model in eval mode, tokenizer). dtype=None keeps float32 compute (bf16 weights are upcast).

    Everything the config implies is checked against the weights' header first; the model is
    built only once names, shapes, dtypes and sizes agree.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "checkpoint directory does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        _regular_file(path / name)
    try:
        config = ChiarConfig.from_json(_read_text(path / CONFIG_FILE, MAX_CONFIG_BYTES))
    except (ConfigError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(path / CONFIG_FILE, f"invalid config: {exc}") from exc
    weights = path / WEIGHTS_FILE
    try:
        check_limits(config, path / CONFIG_FILE)
        header = read_header(weights)
        metadata = header.get("__metadata__") or {}
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise GuardError(weights, f"unknown format version {version!r} (this build reads {FORMAT_VERSION!r})")
        if metadata.get("arch") != config.arch:
            raise GuardError(weights, f"arch {metadata.get('arch')!r} in weights does not match config arch {config.arch!r}")
        check_sizes(config, header, weights)
        check_tensors(config, header, weights)
    except GuardError as exc:
        raise CheckpointError(exc.path, exc.problem) from None
    try:
        tokenizer = Tokenizer.from_str(_read_text(path / TOKENIZER_FILE, MAX_TOKENIZER_BYTES))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(path / TOKENIZER_FILE, f"cannot load tokenizer: {_why(exc)}") from exc
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(
            path / TOKENIZER_FILE, f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than vocab_size {config.vocab_size}"
        )
    try:
        check_hf_files(path)
    except GuardError as exc:
        raise CheckpointError(exc.path, exc.problem) from None
    return _build(config, _read_weights(weights), device, dtype), tokenizer


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the (already checked) weights file; NaN or infinity anywhere is refused, naming the tensor."""
    state = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                state[name] = f.get_tensor(name)
                check_finite(name, state[name], weights)
    except GuardError as exc:
        raise CheckpointError(exc.path, exc.problem) from None
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise CheckpointError(weights, f"corrupt safetensors file: {_why(exc)}") from exc
    return state


def _build(config: ChiarConfig, state: dict[str, torch.Tensor], device: str | torch.device, dtype: torch.dtype | None) -> ChiarLM:
    model = ChiarLM(config)
    model.load_state_dict(state, strict=False)  # strict=False only because the tied lm_head alias is absent
    model = model.to(device=device, dtype=dtype or torch.float32)
    model.eval()
    return model
