"""Giving memory back to the OS after a spike (docs/ARCHITECTURE.md, "Request limits and memory").

glibc keeps freed heap memory for reuse: after a burst of large requests the process stays at its peak
RSS. `Trimmer` is a daemon thread that reads the RSS every `interval` seconds and, once it has grown by
`step` bytes since the last trim, calls malloc_trim(0), which returns every free page of every arena.
Without glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("server.memory")
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)
ARENAS = 2


def limit_arenas(arenas: int = ARENAS) -> bool:
    """glibc's MALLOC_ARENA_MAX from inside the process (call before threads start allocating): fewer arenas hold
    less free memory between bursts (docs/ARCHITECTURE.md). False without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(arenas)))
    except (OSError, AttributeError):
        return False


def freeze_startup_objects() -> int:
    """Collect, then move every object alive now (torch, the model, FastAPI, pydantic schemas) to the GC's permanent
    generation: later full collections skip them (in the server a full collection took 70-120 ms, stalling the
    event loop and the engine alike). Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is absent)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


class Trimmer(threading.Thread):
    """malloc_trim(0) whenever the RSS has grown by `step` bytes since the last trim (checked every `interval` s)."""

    def __init__(self, interval: float = 2.0, step: int = 16 * 2**20) -> None:
        super().__init__(name="malloc-trim", daemon=True)
        self.interval = interval
        self.step = step
        self.trim = _malloc_trim()
        self.trims = 0
        self.returned = 0  # bytes of RSS the trims gave back
        self._stop_event = threading.Event()

    @property
    def available(self) -> bool:
        return self.trim is not None and rss_bytes() > 0

    def run(self) -> None:
        low = rss_bytes()
        while not self._stop_event.wait(self.interval):
            now = rss_bytes()
            if now < low:
                low = now
            elif now - low >= self.step:
                low = self.trim_now()

    def trim_now(self) -> int:
        """Trim at once; returns the RSS after."""
        before, start = rss_bytes(), time.perf_counter()
        if self.trim is not None:
            self.trim(0)  # ctypes releases the GIL; malloc calls of other threads wait for the arena it trims
        after, seconds = rss_bytes(), time.perf_counter() - start
        self.trims += 1
        self.returned += max(0, before - after)
        (log.warning if seconds > 0.05 else log.debug)("malloc_trim: RSS %.1f -> %.1f MB in %.1f ms", before / 2**20,
                                                        after / 2**20, seconds * 1e3)
        return after

    def stop(self) -> None:
        self._stop_event.set()
