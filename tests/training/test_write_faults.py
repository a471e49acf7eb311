"""A failed checkpoint write (file-size limit, disk full, read-only directory) ends a real training run
with exit status 2 and one `error:` line naming the path; the previous checkpoint stays intact and a
later run resumes from it.

Disk full and read-only use a small tmpfs and a read-only bind mount, which need root with
CAP_SYS_ADMIN; without root the read-only case uses chmod instead (root ignores permission bits), and
only a root without CAP_SYS_ADMIN skips these two.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.training.helpers import read_log, run_module, tiny_train_config, write_config

IS_ROOT = os.geteuid() == 0


def _can_mount() -> bool:
    """Root with CAP_SYS_ADMIN (a plain container's root cannot mount)."""
    if not IS_ROOT:
        return False
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True).returncode != 0:
            return False
        subprocess.run(["umount", d], check=True)
    return True


CAN_MOUNT = _can_mount()


def _config(tmp_path: Path, corpus: Path, out_dir: Path, max_steps: int) -> Path:
    raw = tiny_train_config(out_dir, corpus, max_steps=max_steps, checkpoint_every=4, eval_every=4, keep_last=3)
    return write_config(tmp_path / f"train-{max_steps}.yaml", raw)


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _train(config: Path, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return run_module(["training", "train", "--config", str(config)], timeout=300, preexec_fn=preexec_fn)


def _first_run(tmp_path: Path, corpus: Path, out_dir: Path) -> Path:
    done = _train(_config(tmp_path, corpus, out_dir, 4))
    assert done.returncode == 0, done.stderr[-3000:]
    step4 = out_dir / "checkpoints" / "step-00000004"
    assert step4.is_dir()
    return step4


def _assert_clean_failure(result: subprocess.CompletedProcess[str], out_dir: Path, step4: Path, before: dict[str, str],
                          reason: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert str(out_dir) in lines[0] and reason in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert _digest(step4) == before  # the previous checkpoint is untouched
    leftovers = [p.name for p in (out_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def _resume_succeeds(tmp_path: Path, corpus: Path, out_dir: Path) -> None:
    done = _train(_config(tmp_path, corpus, out_dir, 8))
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r["step"] for r in read_log(out_dir)]
    assert steps[-1] == 8 and 5 in steps
    assert (out_dir / "checkpoints" / "step-00000008").is_dir()


def test_file_size_limit(tmp_path: Path, corpus_dir: Path) -> None:
    out_dir = tmp_path / "run"
    step4 = _first_run(tmp_path, corpus_dir, out_dir)
    before = _digest(step4)
    limit = (step4 / "model.safetensors").stat().st_size // 2

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = _train(_config(tmp_path, corpus_dir, out_dir, 8), preexec_fn=limit_file_size)
    _assert_clean_failure(result, out_dir, step4, before, "too large")
    _resume_succeeds(tmp_path, corpus_dir, out_dir)


@contextlib.contextmanager
def _mounted(*args: str) -> Iterator[None]:
    target = args[-1]
    subprocess.run(["mount", *args], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", target], check=True, capture_output=True)


@pytest.mark.skipif(not CAN_MOUNT, reason="a size-limited tmpfs needs root with CAP_SYS_ADMIN")
def test_disk_full(tmp_path: Path, corpus_dir: Path) -> None:
    staging = tmp_path / "staging"
    step4 = _first_run(tmp_path, corpus_dir, staging)
    used = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    # room for what exists plus a little log, not for a second checkpoint
    with _mounted("-t", "tmpfs", "-o", f"size={used + 96 * 1024}", "tmpfs", str(out_dir)):
        shutil.copytree(staging, out_dir, dirs_exist_ok=True)
        step4 = out_dir / "checkpoints" / "step-00000004"
        before = _digest(step4)
        result = _train(_config(tmp_path, corpus_dir, out_dir, 8))
        _assert_clean_failure(result, out_dir, step4, before, "No space left on device")
        shutil.copytree(out_dir, staging, dirs_exist_ok=True)
    shutil.rmtree(out_dir)
    shutil.copytree(staging, out_dir)
    _resume_succeeds(tmp_path, corpus_dir, out_dir)


@pytest.mark.skipif(IS_ROOT and not CAN_MOUNT, reason="root ignores chmod and cannot mount read-only here")
def test_read_only_directory(tmp_path: Path, corpus_dir: Path) -> None:
    out_dir = tmp_path / "run"
    step4 = _first_run(tmp_path, corpus_dir, out_dir)
    before = _digest(step4)
    ckpts = out_dir / "checkpoints"
    if IS_ROOT:  # root ignores permission bits: make the filesystem itself read-only
        with _mounted("--bind", str(ckpts), str(ckpts)):
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ckpts)], check=True, capture_output=True)
            result = _train(_config(tmp_path, corpus_dir, out_dir, 8))
        reason = "Read-only file system"
    else:
        ckpts.chmod(0o555)
        try:
            result = _train(_config(tmp_path, corpus_dir, out_dir, 8))
        finally:
            ckpts.chmod(0o755)
        reason = "Permission denied"
    _assert_clean_failure(result, out_dir, step4, before, reason)
    _resume_succeeds(tmp_path, corpus_dir, out_dir)
