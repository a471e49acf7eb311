"""Checks a checkpoint's config against its safetensors header before any model memory is allocated.

`load_checkpoint` runs these in order, each failing with one line that names the file and the field:
1. `check_limits`: every size field within the documented maximum (`LIMITS`);
2. `read_header`: the header parsed and validated by hand (no tensor data read), so truncation,
   corruption and absurd offsets give precise messages instead of allocator or parser errors;
3. `check_sizes`: name-independent lower bounds. `vocab_size`, `d_model` and `d_ff` must each be a
   dimension of some stored tensor, and `n_layers` layers of at least d_model x d_ff weights must
   fit in the stored element count, so a config cannot imply more parameters than the file holds;
4. `check_tensors`: the exact names, shapes and dtypes of the model the config describes, built
   without parameter memory (`_ShapeOnly`), against the header.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .config import ChiarConfig
from .storage import SAFETENSORS_DTYPES

# Bytes per element of each safetensors dtype tag this build can meet.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_TAG_NAMES = {tag: name for name, tag in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit


@dataclass(frozen=True)
class Limits:
    """Documented maxima of the size fields this build loads (docs/ARCHITECTURE.md, RELIABILITY.md)."""

    vocab_size: int = 2**21
    d_model: int = 2**16
    n_layers: int = 1024
    d_ff: int = 2**18
    n_heads: int = 1024
    rbf_centers: int = 2**16
    max_seq_len: int = 2**20
    rotary_table_bytes: int = 2**30  # max_seq_len x head_dim float32 cos + sin tables, once fully grown


LIMITS = Limits()


class GuardError(ValueError):
    """A check failed; `path` is the file to blame (config.json or the weights)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


def check_limits(config: ChiarConfig, config_path: Path, limits: Limits = LIMITS) -> None:
    """Every size field at most its documented maximum; the rotary tables within their budget."""
    for name in ("vocab_size", "d_model", "n_layers", "d_ff", "n_heads", "rbf_centers", "max_seq_len"):
        value, cap = getattr(config, name), getattr(limits, name)
        if value > cap:
            raise GuardError(config_path, f"{name}: {value} exceeds the documented maximum {cap} this build loads")
    rotary = config.max_seq_len * config.head_dim * 8  # cos + sin, [positions, head_dim] float32 each (grown on use)
    if rotary > limits.rotary_table_bytes:
        raise GuardError(config_path, f"max_seq_len: {config.max_seq_len} x head_dim {config.head_dim} needs {rotary} bytes of "
                                      f"rotary tables, over the documented maximum {limits.rotary_table_bytes}")


def _entry_ok(entry: object) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets) and offsets[0] <= offsets[1])


def read_header(weights: Path) -> dict:
    """The safetensors header as {name: {dtype, shape, data_offsets}} plus "__metadata__", validated."""
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise GuardError(weights, f"truncated or corrupt safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise GuardError(weights, "truncated or corrupt safetensors file (header longer than the file)")
        if header_len > MAX_HEADER_BYTES:
            raise GuardError(weights, f"corrupt safetensors header: {header_len} bytes, over the format's {MAX_HEADER_BYTES}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise GuardError(weights, f"corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise GuardError(weights, "corrupt safetensors header: not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise GuardError(weights, "corrupt safetensors header: __metadata__ must map names to strings")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not _entry_ok(entry):
            raise GuardError(weights, f"corrupt safetensors header: bad entry for {name!r}")
        itemsize = _ITEMSIZE.get(entry["dtype"])
        start, end = entry["data_offsets"]
        if itemsize is not None and end - start != math.prod(entry["shape"]) * itemsize:
            raise GuardError(weights, f"corrupt safetensors header: {name} has shape {entry['shape']} but {end - start} bytes")
    data_end = max((e["data_offsets"][1] for n, e in header.items() if n != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise GuardError(weights, f"truncated safetensors file: tensors need {8 + header_len + data_end} bytes, file has {size}")
    return header


def _tensors(header: dict) -> dict[str, dict]:
    return {n: e for n, e in header.items() if n != "__metadata__"}


def check_sizes(config: ChiarConfig, header: dict, weights: Path) -> None:
    """Name-independent bounds: no config size may imply more than the weights hold."""
    tensors = _tensors(header)
    dims = {d for e in tensors.values() for d in e["shape"]}
    stored = sum(math.prod(e["shape"]) for e in tensors.values())
    for name, wanted in (("vocab_size", (config.vocab_size,)), ("d_model", (config.d_model,)),
                         ("d_ff", (config.d_ff, 2 * config.d_ff))):
        if not dims.intersection(wanted):
            raise GuardError(weights, f"{name}: config says {getattr(config, name)} but no stored tensor has that dimension "
                                      f"(the weights hold {stored} parameters)")
    implied = config.vocab_size * config.d_model + config.n_layers * config.d_model * config.d_ff
    if implied > stored:
        raise GuardError(weights, f"n_layers: {config.n_layers} layers of d_model {config.d_model} x d_ff {config.d_ff} imply at "
                                  f"least {implied} parameters, but the weights hold {stored}")


_SIZED = {"empty", "zeros", "ones", "full", "randn", "rand", "empty_strided"}
_NOT_INIT = {"resize_", "set_", "resize_as_", "requires_grad_", "share_memory_"}


def _size(args: tuple) -> tuple[int, ...]:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    return tuple(a for a in args if isinstance(a, int))


class _ShapeOnly(TorchFunctionMode):
    """Builds modules without parameter memory: sized constructors return zero-stride views of one
    scalar and in-place initialisers do nothing; every other op runs for real.

    The meta device would do the same, but its first use imports torch._dynamo (seconds per process).
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _SIZED:
            size = _size(args[:1] if name in ("full", "empty_strided") else args)
            return torch.zeros((), dtype=kwargs.get("dtype") or torch.get_default_dtype()).expand(size)
        if name.endswith("_") and not name.startswith("__") and name not in _NOT_INIT:
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is not None:
                return first
        return func(*args, **kwargs)


def expected_shapes(config: ChiarConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of the tensors a checkpoint of `config` stores, built without memory."""
    from .chiar import ChiarLM  # here, not at import time: the guard itself must stay light

    with _ShapeOnly():
        model = ChiarLM(config)
    state = model.state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}


def _field_hint(config: ChiarConfig, stored: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """Which config field a differing dimension comes from, when one matches."""
    candidates = {"vocab_size": config.vocab_size, "d_model": config.d_model, "d_ff": config.d_ff,
                  "rbf_centers": config.rbf_centers, "n_heads": config.n_heads}
    for got, want in zip(stored, expected):
        if got != want:
            for name, value in candidates.items():
                if want in (value, 2 * value, 3 * value):
                    return f" (config field {name} = {value})"
    return ""


def check_tensors(config: ChiarConfig, header: dict, weights: Path) -> None:
    """Exact names, shapes and dtypes against the model the config describes."""
    tensors = _tensors(header)
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise GuardError(weights, f"tensor names do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tag = SAFETENSORS_DTYPES[config.weights_dtype]
    for name, (shape, _) in expected.items():
        entry = tensors[name]
        stored = tuple(entry["shape"])
        if stored != shape:
            raise GuardError(weights, f"shape mismatch for {name}: stored {stored}, config expects {shape}"
                                      + _field_hint(config, stored, shape))
        if entry["dtype"] != tag:
            stored_dtype = _TAG_NAMES.get(entry["dtype"], entry["dtype"])
            raise GuardError(weights, f"dtype mismatch for {name}: stored {stored_dtype}, config says {config.weights_dtype}")


FINITE_CHUNK = 2**24  # elements checked at once: the boolean mask stays at 16 MB whatever the tensor's size


def check_finite(name: str, tensor: torch.Tensor, weights: Path) -> None:
    """Refuse NaN or infinity anywhere in a floating-point tensor (e.g. all-0xFF bf16 bytes), naming the tensor."""
    if not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), FINITE_CHUNK):
        if not bool(torch.isfinite(flat[start:start + FINITE_CHUNK]).all()):
            nan = sum(int(flat[i:i + FINITE_CHUNK].isnan().sum()) for i in range(0, flat.numel(), FINITE_CHUNK))
            inf = sum(int(flat[i:i + FINITE_CHUNK].isinf().sum()) for i in range(0, flat.numel(), FINITE_CHUNK))
            raise GuardError(weights, f"non-finite weights in {name}: {nan} NaN and {inf} infinite of {flat.numel()} values")
