"""Checkpoint directories: config.json + model.safetensors + tokenizer.json. No pickle anywhere.

Writes are atomic (a temporary sibling directory renamed into place), so a crash never leaves
a half-written checkpoint under the target name.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from .chiar import ChiarLM
from .config import ChiarConfig, ConfigError

FORMAT_VERSION = "1"
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded or saved; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def _unique_state(model: ChiarLM) -> dict[str, torch.Tensor]:
    """State dict without the tied lm_head alias (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(model: ChiarLM, tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write the checkpoint directory atomically; config thresholds follow the model's routers."""
    path = Path(path)
    config = model.config
    if config.arch == "chiar":
        config = config.replace(thresholds=model.routing_thresholds(), bands=model.routing_bands() or config.bands)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(path / TOKENIZER_FILE, f"tokenizer has {tokenizer.get_vocab_size()} tokens but vocab_size is {config.vocab_size}")
    dtype = _DTYPES[config.weights_dtype]
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in _unique_state(model).items()}
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    except OSError as exc:
        raise CheckpointError(path, f"cannot write checkpoint directory: {exc.strerror or exc}") from exc
    try:
        (tmp / CONFIG_FILE).write_text(config.to_json())
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format_version": FORMAT_VERSION, "arch": config.arch})
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if path.exists():
            old = parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _read_header(weights: Path) -> dict:
    """Parse the safetensors header ourselves so truncation gives a precise message."""
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(weights, f"truncated or corrupt safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(weights, "truncated or corrupt safetensors file (header longer than the file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(weights, f"corrupt safetensors header: {exc}") from exc
    data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(weights, f"truncated safetensors file: tensors need {8 + header_len + data_end} bytes, file has {size}")
    return header


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[ChiarLM, Tokenizer]:
    """Load (model in eval mode, tokenizer). dtype=None keeps float32 compute (bf16 weights are upcast)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "checkpoint directory does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise CheckpointError(path / name, "missing file")
    try:
        config = ChiarConfig.from_json((path / CONFIG_FILE).read_text())
    except (ConfigError, UnicodeDecodeError) as exc:
        raise CheckpointError(path / CONFIG_FILE, f"invalid config: {exc}") from exc
    weights = path / WEIGHTS_FILE
    header = _read_header(weights)
    metadata = header.get("__metadata__") or {}
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(weights, f"unknown format version {version!r} (this build reads {FORMAT_VERSION!r})")
    if metadata.get("arch") != config.arch:
        raise CheckpointError(weights, f"arch {metadata.get('arch')!r} in weights does not match config arch {config.arch!r}")
    model = ChiarLM(config)
    expected = _unique_state(model)
    stored_dtype = _DTYPES[config.weights_dtype]
    missing = sorted(set(expected) - set(header) - {"__metadata__"})
    unexpected = sorted(set(header) - set(expected) - {"__metadata__"})
    if missing or unexpected:
        raise CheckpointError(weights, f"tensor names do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name, target in expected.items():
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointError(weights, f"shape mismatch for {name}: stored {tuple(tensor.shape)}, config expects {tuple(target.shape)}")
                if tensor.dtype != stored_dtype:
                    raise CheckpointError(weights, f"dtype mismatch for {name}: stored {tensor.dtype}, config says {config.weights_dtype}")
                state[name] = tensor
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise CheckpointError(weights, f"corrupt safetensors file: {exc}") from exc
    model.load_state_dict(state, strict=False)  # strict=False only because the tied lm_head alias is absent
    try:
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    except Exception as exc:
        raise CheckpointError(path / TOKENIZER_FILE, f"cannot load tokenizer: {exc}") from exc
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(path / TOKENIZER_FILE, f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than vocab_size {config.vocab_size}")
    model = model.to(device=device, dtype=dtype or torch.float32)
    model.eval()
    return model, tokenizer
