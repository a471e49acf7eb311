"""What every benchmark shares: timing medians, percentiles, the machine line, the BENCHMARKS.md writer."""

from __future__ import annotations

import datetime as dt
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from loadtests.server_process import ROOT
from model.storage import atomic_write_text


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each fn, timed round-robin so drift in machine load hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def fmt(value: float) -> str:
    """One decimal, '-' for NaN (no sample)."""
    return "-" if value != value else f"{value:.1f}"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile q in [0, 1]; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def git_commit() -> str:
    """The checked-out commit (short hash), or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_line() -> str:
    """Machine, date and commit for every benchmark table."""
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = git_commit()
    device = f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU (CPU numbers only)"
    return (f"{platform.node()}: {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}; date {dt.date.today().isoformat()}; commit {commit}; {device}")


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers, keeping the others; atomic."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery number here was measured by `make bench` and written by it.\n"
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def relative(paths: dict[str, Path]) -> dict[str, Path]:
    """Checkpoint paths as the reports show them: relative to the repository when inside it."""
    return {k: v.relative_to(ROOT) if v.is_relative_to(ROOT) else v for k, v in paths.items()}
