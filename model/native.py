"""The native CPU kernels (csrc/, built into `model._native` at install time) and their packed weights.

`load()` returns the extension module, or None with the reason in `unavailable_reason()` (not
built, or a platform it was not built for); the eager kernels then run instead.

A `PackedWeights` holds every matrix of a model in the kernels' panel layout, in bfloat16 where
bfloat16 holds the weight exactly (the demo checkpoints are stored in bf16: half the bytes to read,
identical values) and in float32 otherwise. Packs follow their parameters: `refresh()` repacks
whatever changed in place since (training between evaluations, tests editing weights).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

_module: ModuleType | None = None
_reason: str | None = None


def load() -> ModuleType | None:
    global _module, _reason
    if _module is None and _reason is None:
        try:
            _module = importlib.import_module("model._native")
        except ImportError as exc:
            _reason = f"the native kernels are not built ({exc}); reinstall with deploy/install.sh"
    return _module


def unavailable_reason() -> str | None:
    load()
    return _reason


def bf16_exact(weight: Tensor) -> bool:
    """True when every value of `weight` is a bfloat16 value (packing it in bf16 loses nothing)."""
    return bool(torch.equal(weight.detach().to(torch.bfloat16).to(weight.dtype), weight.detach()))


def _version(tensor: Tensor) -> tuple[int, int]:
    try:
        version = tensor._version
    except RuntimeError:  # inference tensors carry no version counter
        version = -1
    return tensor.data_ptr(), version


class PackedWeights:
    """Packed matrices keyed by name, each rebuilt when the tensors it came from change."""

    def __init__(self, native: ModuleType) -> None:
        self.native = native
        self._packs: dict[str, Any] = {}
        self._sources: dict[str, tuple[list[Tensor], Callable[[], Tensor], list[tuple[int, int]]]] = {}

    def add(self, name: str, sources: list[Tensor], matrix: Callable[[], Tensor]) -> None:
        """Pack `matrix()` ([out, in] float32) now and again whenever one of `sources` changes."""
        self._sources[name] = (sources, matrix, [_version(t) for t in sources])
        self._pack(name)

    def _pack(self, name: str) -> None:
        sources, matrix, _ = self._sources[name]
        weight = matrix().detach().float().contiguous()
        self._packs[name] = self.native.pack(weight, bf16_exact(weight))
        self._sources[name] = (sources, matrix, [_version(t) for t in sources])

    def refresh(self) -> None:
        for name, (sources, _, versions) in self._sources.items():
            if [_version(t) for t in sources] != versions:
                self._pack(name)

    def __getitem__(self, name: str) -> Any:
        return self._packs[name]

    def bf16_share(self) -> float:
        """Share of packed parameters held in bfloat16."""
        total = sum(p.out_features * p.in_features for p in self._packs.values())
        return sum(p.out_features * p.in_features for p in self._packs.values() if p.bf16) / max(total, 1)
