"""Locust against a real server: the CI load test (zero failures) and the stress scenario."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.metrics_snapshot import parse
from loadtests.run import parse_args, run

ENDPOINTS = {"/v1/generate", "/v1/generate [stream]", "/v1/perplexity", "/v1/perplexity [long]",
             "/v1/completions", "/v1/completions [echo logprobs]"}


def test_ci_load_test_has_zero_failures(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """8 users for 20 s over every endpoint; every response's content is checked by the locustfile."""
    summary = run(parse_args(["--checkpoint", str(tiny_checkpoint), "--users", "8", "--spawn-rate", "8",
                              "--run-time", "20s", "--out", str(tmp_path)]))
    assert summary.locust_exit_code == 0 and summary.total.failures == 0, (tmp_path / "summary.md").read_text()
    counts = {e.name: e.requests for e in summary.endpoints}
    assert set(counts) >= ENDPOINTS, counts
    assert all(counts[name] > 0 for name in ENDPOINTS)
    assert summary.total.requests >= 50 and summary.total.rps > 1
    for e in summary.endpoints:
        assert 0 < e.p50_ms <= e.p95_ms <= e.p99_ms <= max(e.max_ms, e.p99_ms)
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
