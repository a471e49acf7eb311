"""Output-path checks done before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

from training.errors import TrainingError


def check_path_usable(path: Path, where: str) -> None:
    """Fail early (before any output) if `path` is a file, lies under one, or under a read-only directory."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise TrainingError(f"{where}: cannot write to {path}: {parent} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise TrainingError(f"{where}: cannot write to {path}: {parent} is not writable")
            return


def probe_writable(directory: Path, where: str) -> None:
    """Create `directory` if needed and prove a file can be written there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"{where}: cannot write to {directory}: {exc.strerror or exc}") from None
