"""The `mixed-flood` scenario's per-class summary and pass/fail checks (traffic: flood_locustfile.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

STREAM_TOTAL = "/v1/generate [long stream total]"
STREAM_TTFT = "/v1/generate [long stream ttft]"
ITL = "stream ITL"
FLOOD = "/v1/perplexity [flood]"
SHORT = "/v1/generate [short]"
SHED_SUFFIX = " [503 shed]"


class Row(Protocol):
    """What this module reads of a locust stats row (loadtests.run.Endpoint)."""

    name: str
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float


@dataclass
class FloodCounts:
    """What the flood locustfile counted (CHIAR_LOADTEST_COUNTS)."""

    streams_begun: int = 0
    streams_completed: int = 0
    streams_shed: int = 0
    flood_requests: int = 0
    flood_scored_tokens: int = 0
    flood_first_start: float = 0.0
    flood_last_end: float = 0.0

    @classmethod
    def read(cls, path: Path) -> FloodCounts:
        """The counts file, or zeros when locust wrote none (it then made no request)."""
        if not path.is_file():
            return cls()
        raw: dict[str, Any] = json.loads(path.read_text())
        return cls(**{k: type(getattr(cls, k))(v) for k, v in raw.items() if k in cls.__dataclass_fields__})


@dataclass
class ClassStats:
    """One traffic class: requests, failures, shed, and its latency p50/p95 (ms)."""

    requests: int
    failures: int
    shed: int
    p50_ms: float
    p95_ms: float


@dataclass
class FloodSummary:
    """Per class: long streams (ITL and TTFT), the perplexity flood (scored tokens/s), short requests."""

    streams: ClassStats
    stream_ttft_p50_ms: float
    stream_ttft_p95_ms: float
    itl_samples: int
    itl_p50_ms: float
    itl_p95_ms: float
    flood: ClassStats
    flood_scored_tokens: int
    flood_tokens_per_s: float
    short: ClassStats
    counts: FloodCounts


def _class(rows: dict[str, Row], name: str) -> ClassStats:
    row, shed = rows.get(name), rows.get(name + SHED_SUFFIX)
    nan = float("nan")
    return ClassStats(requests=row.requests if row else 0, failures=row.failures if row else 0,
                      shed=shed.requests if shed else 0, p50_ms=row.p50_ms if row else nan, p95_ms=row.p95_ms if row else nan)


def summarise(endpoints: list[Row], counts: FloodCounts) -> FloodSummary:
    """Per-class numbers from the locust rows and the locustfile's counts."""
    rows = {e.name: e for e in endpoints}
    ttft, itl = rows.get(STREAM_TTFT), rows.get(ITL)
    span = counts.flood_last_end - counts.flood_first_start
    nan = float("nan")
    return FloodSummary(
        streams=_class(rows, STREAM_TOTAL), stream_ttft_p50_ms=ttft.p50_ms if ttft else nan,
        stream_ttft_p95_ms=ttft.p95_ms if ttft else nan, itl_samples=itl.requests if itl else 0,
        itl_p50_ms=itl.p50_ms if itl else nan, itl_p95_ms=itl.p95_ms if itl else nan,
        flood=_class(rows, FLOOD), flood_scored_tokens=counts.flood_scored_tokens,
        flood_tokens_per_s=counts.flood_scored_tokens / span if span > 0 else nan,
        short=_class(rows, SHORT), counts=counts)


def checks(s: FloodSummary, total_failures: int) -> dict[str, dict[str, Any]]:
    """No failure other than shed load (503 + Retry-After); every stream that began completed.

    Latency targets are benchmark numbers (BENCHMARKS.md), not checks: CPU noise would make them flaky.
    """
    c = s.counts
    unfinished = c.streams_begun - c.streams_completed - c.streams_shed
    return {
        "only_shed_failures": {"ok": total_failures == 0,
                               "detail": f"{total_failures} failures other than 503 + Retry-After "
                                         f"(shed: {s.streams.shed} streams, {s.flood.shed} flood, {s.short.shed} short)"},
        "every_stream_completes": {"ok": c.streams_completed > 0 and unfinished == 0,
                                   "detail": f"{c.streams_begun} streams begun, {c.streams_completed} completed, "
                                             f"{c.streams_shed} shed, {unfinished} unfinished"},
        "every_class_served": {"ok": min(s.streams.requests, s.flood.requests, s.short.requests, s.itl_samples) > 0,
                               "detail": f"{s.streams.requests} streams, {s.itl_samples} ITL samples, "
                                         f"{s.flood.requests} flood, {s.short.requests} short requests"},
    }


def markdown(s: FloodSummary) -> list[str]:
    """The per-class table for summary.md."""
    def fmt(x: float) -> str:
        return "-" if x != x else f"{x:.0f}"

    return ["| class | requests | failures | shed | measure | p50 ms | p95 ms |", "|---|---:|---:|---:|---|---:|---:|",
            f"| long streams | {s.streams.requests} | {s.streams.failures} | {s.streams.shed} | inter-token latency "
            f"({s.itl_samples} gaps) | {fmt(s.itl_p50_ms)} | {fmt(s.itl_p95_ms)} |",
            f"| long streams | | | | time to first token | {fmt(s.stream_ttft_p50_ms)} | {fmt(s.stream_ttft_p95_ms)} |",
            f"| long streams | | | | total | {fmt(s.streams.p50_ms)} | {fmt(s.streams.p95_ms)} |",
            f"| short (1 token) | {s.short.requests} | {s.short.failures} | {s.short.shed} | latency | {fmt(s.short.p50_ms)} "
            f"| {fmt(s.short.p95_ms)} |",
            f"| perplexity flood | {s.flood.requests} | {s.flood.failures} | {s.flood.shed} | latency | {fmt(s.flood.p50_ms)} "
            f"| {fmt(s.flood.p95_ms)} |",
            "", f"Flood: {s.flood_scored_tokens} tokens scored, {s.flood_tokens_per_s:.1f} scored tokens/s "
                f"over its active span.", ""]
