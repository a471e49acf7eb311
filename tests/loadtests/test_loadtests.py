"""Locust against a real server: the CI load test (zero failures), the stress and mixed-flood scenarios."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests import flood
from loadtests.metrics_snapshot import parse
from loadtests.run import DERIVED_TYPE, parse_args, run

ENDPOINTS = {"/v1/generate", "/v1/generate [stream total]", "/v1/perplexity", "/v1/perplexity [long]",
             "/v1/completions", "/v1/completions [echo logprobs]"}
DERIVED = {"/v1/generate [stream ttft]", "stream ITL"}


def test_ci_load_test_has_zero_failures(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """8 users for 20 s over every endpoint; every response's content is checked by the locustfile."""
    summary = run(parse_args(["--checkpoint", str(tiny_checkpoint), "--users", "8", "--spawn-rate", "8",
                              "--run-time", "20s", "--out", str(tmp_path)]))
    assert summary.locust_exit_code == 0 and summary.total.failures == 0, (tmp_path / "summary.md").read_text()
    counts = {e.name: e.requests for e in summary.endpoints}
    assert set(counts) >= ENDPOINTS | DERIVED, counts
    assert all(counts[name] > 0 for name in ENDPOINTS | DERIVED)
    assert summary.total.requests >= 50 and summary.total.rps > 1
    rows = {e.name: e for e in summary.endpoints}
    # the aggregate counts requests only, not the TTFT/ITL measurements derived from streams
    assert {n for n, e in rows.items() if e.request_type == DERIVED_TYPE} == DERIVED
    assert summary.total.requests == sum(e.requests for e in summary.endpoints if e.request_type != DERIVED_TYPE)
    for e in summary.endpoints:
        low = e.p50_ms >= 0 if e.name == "stream ITL" else e.p50_ms > 0  # ITL can round to 0 ms
        assert low and e.p50_ms <= e.p95_ms <= e.p99_ms <= max(e.max_ms, e.p99_ms)
    # a stream is timed to its last byte: never shorter than its time to the first token (same streams)
    assert rows["/v1/generate [stream ttft]"].requests == rows["/v1/generate [stream total]"].requests
    assert rows["/v1/generate [stream total]"].p50_ms >= rows["/v1/generate [stream ttft]"].p50_ms
    assert summary.generated_tokens > 0 and summary.generated_tokens_per_s > 0
    share = summary.routing_share_during
    assert share is not None and 0 < share["attention"] < 1 and abs(sum(share.values()) - 1) < 1e-9
    for name in ("locust_final.json", "locust_stats.csv", "locust_failures.csv", "report.html", "summary.md", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "server.log").exists()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["ok"] is True and saved["total"]["failures"] == 0
    assert "| /v1/perplexity [long] |" in (tmp_path / "summary.md").read_text()


def test_stress_sheds_excess_with_503_and_recovers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """48 users without think time against a queue of 4: only 503 + Retry-After for the excess, no
    other error, nothing beyond the timeout, bounded RSS, a normal request within 1 s afterwards."""
    summary = run(parse_args(["--checkpoint", str(tiny_checkpoint), "--scenario", "stress", "--run-time", "15s",
                              "--max-rss-growth-mb", "256", "--out", str(tmp_path)]))
    report = (tmp_path / "summary.md").read_text()
    assert set(summary.checks) == {"excess_shed_with_503", "no_other_errors", "server_counts_agree",
                                   "no_wait_beyond_timeout", "rss_bounded", "recovers_within_1s"}
    failed = {k: v for k, v in summary.checks.items() if not v["ok"]}
    assert not failed, report
    assert summary.ok and summary.total.failures == 0, report
    served = sum(e.requests for e in summary.endpoints if "503" not in e.name and e.name in ENDPOINTS)
    shed = sum(e.requests for e in summary.endpoints if e.name.endswith("[503 shed]"))
    assert served > 0 and shed > served, report  # the load really went past the queue


def test_mixed_flood_streams_complete_and_every_class_is_reported(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """6 users for 15 s: long streams, a perplexity flood and 1-token requests at once. The scenario's
    checks pass (no failure but shed load, every stream completes) and each class has its numbers."""
    summary = run(parse_args(["--checkpoint", str(tiny_checkpoint), "--scenario", "mixed-flood", "--users", "6",
                              "--run-time", "15s", "--out", str(tmp_path)]))
    report = (tmp_path / "summary.md").read_text()
    assert set(summary.checks) == {"only_shed_failures", "every_stream_completes", "every_class_served"}, report
    assert not {k: v for k, v in summary.checks.items() if not v["ok"]}, report
    assert summary.ok and summary.locust_exit_code == 0, report
    f = summary.flood
    assert f is not None
    assert f.streams.requests > 0 and f.flood.requests > 0 and f.short.requests > 0, report
    assert f.streams.failures == f.flood.failures == f.short.failures == 0, report
    assert f.counts.streams_completed == f.streams.requests, report
    assert f.itl_samples >= f.streams.requests, report  # a completed long stream has many token events
    assert 0 <= f.itl_p50_ms <= f.itl_p95_ms and 0 < f.short.p50_ms <= f.short.p95_ms, report
    assert f.stream_ttft_p50_ms <= f.streams.p50_ms, report
    assert f.flood_scored_tokens > 0 and f.flood_tokens_per_s > 0, report
    assert f.counts.flood_requests == f.flood.requests, report
    assert "## Per class" in report and "| long streams |" in report
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["ok"] is True and saved["flood"]["flood_scored_tokens"] == f.flood_scored_tokens


def test_flood_checks_fail_on_unfinished_streams_and_failures() -> None:
    counts = flood.FloodCounts(streams_begun=5, streams_completed=4, streams_shed=0, flood_requests=3,
                               flood_scored_tokens=300, flood_first_start=10.0, flood_last_end=13.0)
    stats = flood.ClassStats(requests=4, failures=0, shed=0, p50_ms=1.0, p95_ms=2.0)
    s = flood.FloodSummary(streams=stats, stream_ttft_p50_ms=1.0, stream_ttft_p95_ms=1.0, itl_samples=40,
                           itl_p50_ms=1.0, itl_p95_ms=2.0, flood=stats, flood_scored_tokens=300,
                           flood_tokens_per_s=100.0, short=stats, counts=counts)
    result = flood.checks(s, total_failures=2)
    assert not result["every_stream_completes"]["ok"] and "1 unfinished" in result["every_stream_completes"]["detail"]
    assert not result["only_shed_failures"]["ok"]
    assert result["every_class_served"]["ok"]
    counts.streams_shed = 1  # the fifth was shed with 503: nothing left unfinished
    assert all(c["ok"] for c in flood.checks(s, total_failures=0).values())


def test_routing_share_uses_only_routing_layers() -> None:
    text = "\n".join([
        "# TYPE chiar_tokens_routed_total counter",
        'chiar_tokens_routed_total{layer="1",operator="dct",phase="prefill"} 10',
        'chiar_tokens_routed_total{layer="2",operator="dct",phase="prefill"} 3',
        'chiar_tokens_routed_total{layer="2",operator="attention",phase="decode"} 7',
        'chiar_tokens_routed_total{layer="3",operator="dct",phase="prefill"} 5',
        'chiar_tokens_routed_total{layer="3",operator="attention",phase="prefill"} 5',
        'chiar_tokens_routed_total{layer="4",operator="attention",phase="prefill"} 10',
        "# TYPE chiar_generation_tokens_total counter",
        "chiar_generation_tokens_total 4",
        "",
    ])
    snap = parse(text)
    assert snap.n_layers == 4 and snap.generation_tokens == 4
    assert snap.routing_share() == {"attention": 0.6, "dct": 0.4}
    assert snap.minus(snap).routing_share() is None
