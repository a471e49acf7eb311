"""Resident set size of a server while it is under load (the stress checks, the peer benchmark)."""

from __future__ import annotations

import contextlib
import threading

import psutil


class RssSampler(threading.Thread):
    """Samples the RSS (MiB) of a process, or with ``tree`` of it and all its descendants, every
    ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.25, tree: bool = False) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.tree = tree
        self.samples: list[float] = []
        self._stop_event = threading.Event()

    def sample(self) -> float:
        """Current RSS in MiB (descendants that vanish mid-sample are skipped)."""
        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True) if self.tree else []:
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total / 2**20

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append(self.sample())
            except psutil.Error:
                return
            self._stop_event.wait(self.interval)

    def stop(self) -> list[float]:
        """Stop sampling; returns the samples in MiB."""
        self._stop_event.set()
        self.join(5)
        return self.samples

    @property
    def peak(self) -> float:
        """Highest sample so far in MiB (0 before the first)."""
        return max(self.samples, default=0.0)
