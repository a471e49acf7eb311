"""Checks against a live server process: promtool on /metrics, dashboard and rules vs exported names."""

from __future__ import annotations

import json
import shutil
import subprocess

import yaml

from loadtests.metrics_snapshot import parse
from tests.deploy.promql import metric_names
from tests.support import REPO

DESIGN_METRICS = {
    "chiar_tokens_routed_total", "chiar_metarouter_gate", "chiar_forward_latency_seconds",
    "chiar_request_duration_seconds", "chiar_time_to_first_token_seconds", "chiar_inter_token_latency_seconds",
    "chiar_queue_wait_seconds", "chiar_requests_running", "chiar_requests_waiting", "chiar_batch_size",
    "chiar_prompt_tokens_total", "chiar_generation_tokens_total", "chiar_flops_total", "chiar_request_errors_total",
    "chiar_model_info",
}


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run deploy/install-system.sh"
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60,
                          check=False)


def test_promtool_check_metrics_on_live_scrape(live_metrics: str) -> None:
    res = promtool_check_metrics(live_metrics)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_metrics_can_fail() -> None:
    bad = "# HELP chiar_things Things.\n# TYPE chiar_things counter\nchiar_things 1\n"
    assert promtool_check_metrics(bad).returncode != 0


def test_live_scrape_exports_every_design_metric(live_metrics: str) -> None:
    names = parse(live_metrics).names
    for metric in DESIGN_METRICS:
        assert {metric, metric + "_bucket", metric + "_total"} & names, f"/metrics lacks {metric}"


def exported(live_metrics: str) -> set[str]:
    return parse(live_metrics).names


def test_every_dashboard_query_names_only_exported_metrics(live_metrics: str) -> None:
    names = exported(live_metrics)
    dash = json.loads((REPO / "deploy/grafana/dashboards/chiar-former.json").read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    queries.append(dash["templating"]["list"][0]["definition"].replace("label_values(", "").split(",")[0])
    assert len(queries) >= 20
    for expr in queries:
        used = metric_names(expr)
        assert used, f"no metric in {expr!r}"
        assert used <= names, f"{expr!r} names {used - names}, not exported by the server"


def test_alert_rules_name_only_exported_or_recorded_metrics(live_metrics: str) -> None:
    names = exported(live_metrics)
    groups = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        used = metric_names(rule["expr"])
        assert used and used <= names | recorded, f"{rule.get('alert') or rule['record']}: {used - names - recorded}"


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, endpoint) (rate(chiar_x_bucket{a="b c"}[$__rate_interval])))'
            ' / on (instance) group_left chiar:y:rate5m > 1e3 and chiar_z')
    assert metric_names(expr) == {"chiar_x_bucket", "chiar:y:rate5m", "chiar_z"}
