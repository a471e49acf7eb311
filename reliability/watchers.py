"""What the memory probes watch while they push a server: its RSS, /health latency, and a running stream's stalls."""

from __future__ import annotations

import gc
import json
import multiprocessing
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from reliability.http import raw_request


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` now, in MB (2^20 bytes)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 / 2**20


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class Watcher(threading.Thread):
    """A daemon thread that samples until `stop()`; samples are (monotonic time, value)."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop_event = threading.Event()

    def sample(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)

    def between(self, start: float, end: float) -> list[float]:
        return [v for t, v in self.samples if start <= t <= end]


class RssWatcher(Watcher):
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(interval)
        self.pid = pid

    def sample(self) -> None:
        try:
            self.samples.append((time.monotonic(), rss_mb(self.pid)))
        except OSError:
            self._stop_event.set()


class HealthWatcher(Watcher):
    """GET /health every `interval` on a fresh connection; a failed or late answer counts as its timeout."""

    def __init__(self, url: str, interval: float = 0.02, timeout: float = 5.0) -> None:
        super().__init__(interval)
        self.url = url
        self.timeout = timeout
        self.failures = 0

    def sample(self) -> None:
        start = time.monotonic()
        reply = raw_request(self.url, "GET", "/health", timeout=self.timeout)
        if reply.status != 200:
            self.failures += 1
        self.samples.append((start, time.monotonic() - start if reply.status == 200 else self.timeout))


class StreamWatcher(Watcher):
    """Streams greedy generations back to back; a sample is the gap before each token event after a stream's first."""

    def __init__(self, url: str, headers: dict[str, str], max_new_tokens: int) -> None:
        super().__init__(0.0)
        self.url = url
        self.headers = headers
        self.body = {"prompt": "The history of the", "max_new_tokens": max_new_tokens, "temperature": 0, "stream": True,
                     "ignore_eos": True}
        self.errors: list[str] = []
        self.streams = 0

    def sample(self) -> None:
        last = None
        try:
            with httpx.Client(timeout=60) as client, \
                    client.stream("POST", self.url + "/v1/generate", json=self.body, headers=self.headers) as reply:
                for line in reply.iter_lines():
                    if self._stop_event.is_set():
                        return
                    if not line.startswith("data: {"):
                        continue
                    now = time.monotonic()
                    if json.loads(line[6:]).get("type") == "token" and last is not None:
                        self.samples.append((now, now - last))
                    last = now
                self.streams += 1
        except (httpx.HTTPError, ValueError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.1)


def _watch(pid: int, url: str, headers: dict[str, str], max_new_tokens: int, stop: Any, out: Any) -> None:
    """The watch process: sample until `stop` is set, then send back every sample. Its garbage collector is off: a
    full collection over the objects inherited from the probe took up to 100 ms, which a sample would count."""
    gc.disable()
    health = [HealthWatcher(url), HealthWatcher(url)]
    watchers = [RssWatcher(pid), StreamWatcher(url, headers, max_new_tokens), *health]
    for w in watchers:
        w.start()
    stop.wait()
    for w in watchers:
        w.stop()
    out.send({"rss": watchers[0].samples, "health": sorted(health[0].samples + health[1].samples),
              "health failures": sum(h.failures for h in health), "stream": watchers[1].samples,
              "stream errors": watchers[1].errors, "streams": watchers[1].streams})


class Watch:
    """RSS, /health and a running stream, sampled around a probe's pushes by a process of their own, so the
    probe's client threads cannot delay a sample by holding this process's GIL."""

    def __init__(self, pid: int, url: str, headers: dict[str, str], max_new_tokens: int) -> None:
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_watch, args=(pid, url, headers, max_new_tokens, self._stop, send), daemon=True)
        self.samples: dict[str, Any] = {}

    def __enter__(self) -> Watch:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._receive.poll(90):
            self.samples = self._receive.recv()
        self._process.join(10)

    def between(self, name: str, start: float, end: float) -> list[float]:
        return [v for t, v in self.samples.get(name, []) if start <= t <= end]

    @property
    def stream_errors(self) -> list[str]:
        return list(self.samples.get("stream errors", ["the watch process sent nothing"]))

    def figures(self, start: float, end: float) -> dict[str, float]:
        """Peak RSS, /health latency and stream gaps in [start, end] (ms; MB)."""
        health = [s * 1000 for s in self.between("health", start, end)]
        gaps = [s * 1000 for s in self.between("stream", start, end)]
        return {"peak RSS (MB)": round(max(self.between("rss", start, end), default=float("nan")), 1),
                "/health requests": len(health), "/health p50 (ms)": round(statistics.median(health), 1) if health else float("nan"),
                "/health p90 (ms)": round(quantile(health, 0.9), 1), "/health p99 (ms)": round(quantile(health, 0.99), 1),
                "/health max (ms)": round(max(health, default=float("nan")), 1),
                "stream token events": len(gaps), "stream longest gap (ms)": round(max(gaps, default=float("nan")), 1)}
