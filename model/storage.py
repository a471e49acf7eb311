"""On-disk basics shared by model checkpoints, training, the server and the harnesses: the one
atomic-directory writer, the one atomic single-file writer, the cleanup of what a killed writer leaves
behind, and the weights-dtype maps.

A directory is built under a hidden staging name next to its target, fsynced, and renamed into
place (the old one is first renamed aside, then removed), so a crash at any point leaves the old
directory or the new one under the target name, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import DTYPES

# The torch dtype and the safetensors header tag (read without loading any tensor data) of each name in
# model.config.DTYPES, the one list of weight dtype names (ChiarConfig.weights_dtype, --dtype).
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}
_TAGS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
SAFETENSORS_DTYPES: dict[str, str] = {name: _TAGS[name] for name in DTYPES}

_TMP, _OLD = ".tmp-", ".old-"


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
def atomic_directory(final: Path | str) -> Iterator[Path]:
    """Yield a fresh staging path (not yet created); on success it replaces `final` atomically.

    On any exception the staging directory is removed and `final` is left as it was.
    """
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


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a hidden temporary file in the same directory, fsynced and
    renamed into place: a reader sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def clean_stale(directory: Path, name: str | None = None) -> None:
    """Remove staging leftovers of killed writers; restore a directory caught mid-replacement.

    With `name`, only leftovers of that entry are touched. Also recognises the older
    `.<name>.tmp-XXXX` / `.<name>.old-PID` spelling of earlier checkpoints.
    """
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
