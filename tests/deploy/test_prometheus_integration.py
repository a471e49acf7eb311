"""A real Prometheus (Debian's binary) scrapes a real server every second; PromQL checks the numbers."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loadtests.metrics_snapshot import parse
from loadtests.server_process import ServerProcess, free_port, http_get
from tests.deploy.conftest import post

ROOT = Path(__file__).resolve().parents[2]
JOB = "chiar-it"


class Prometheus:
    """A prometheus process on 127.0.0.1 with a temporary config and TSDB."""

    def __init__(self, workdir: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus not found: run deploy/install-system.sh"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_for(lambda: http_get(self.url + "/-/ready", timeout=1)[0] == 200, 30, "Prometheus ready")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; returns the result vector."""
        status, body = http_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10)
        data = json.loads(body)
        assert status == 200 and data["status"] == "success", f"{expr}: {data}"
        return data["data"]["result"]

    def by_label(self, expr: str, label: str) -> dict[str, float]:
        """Instant query result as {label value: sample value}."""
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def wait_for(self, cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {self.proc.returncode}"
            try:
                if cond():
                    return
            except (OSError, KeyError, IndexError, AssertionError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Prometheus]]:
    """Server + Prometheus scraping it every second, the server's target already up."""
    work = tmp_path_factory.mktemp("prometheus")
    with ServerProcess(tiny_checkpoint, log_path=work / "server.log") as server:
        prom = Prometheus(work, f"127.0.0.1:{server.port}")
        try:
            prom.wait_for(lambda: prom.query(f'up{{job="{JOB}"}}')[0]["value"][1] == "1", 30, "target up")
            yield server, prom
        finally:
            prom.stop()


def test_promql_routed_tokens_sum_to_tokens_processed_and_latency_quantile(stack: tuple[ServerProcess, Prometheus]) -> None:
    server, prom = stack
    prompts = ["The city of", "In 1998 the band released", "Robert Boulter is an English film and television actor"]
    expected_prefill = expected_decode = 0
    latencies = []
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        out = post(server.url + "/v1/generate", {"prompt": prompt, "max_new_tokens": 4 + 3 * i,
                                                   "temperature": 0.0, "ignore_eos": True})
        latencies.append(time.perf_counter() - start)
        assert out["usage"]["completion_tokens"] == 4 + 3 * i
        expected_prefill += out["usage"]["prompt_tokens"]
        expected_decode += out["usage"]["completion_tokens"] - 1  # the last token is never fed back
    tokens_processed = expected_prefill + expected_decode
    direct = parse(http_get(server.url + "/metrics")[1].decode())
    n_layers = direct.n_layers
    assert n_layers == 4

    # Prometheus has scraped everything once its total equals what the server reports now.
    total_expr = f'sum(chiar_tokens_routed_total{{job="{JOB}"}})'
    prom.wait_for(lambda: float(prom.query(total_expr)[0]["value"][1]) == n_layers * tokens_processed, 20,
                  "the scrape after the requests")

    per_operator = prom.by_label(f'sum by (operator) (chiar_tokens_routed_total{{job="{JOB}"}})', "operator")
    assert set(per_operator) == {"identity", "dct", "rbf", "attention"}
    assert sum(per_operator.values()) == n_layers * tokens_processed
    assert per_operator == direct.per_operator()
    assert per_operator["attention"] >= tokens_processed  # the last layer is always attention
    assert per_operator["rbf"] == 0
    per_layer = prom.by_label(f'sum by (layer) (chiar_tokens_routed_total{{job="{JOB}"}})', "layer")
    assert per_layer == {str(layer): tokens_processed for layer in range(1, n_layers + 1)}
    per_phase = prom.by_label(f'sum by (phase) (chiar_tokens_routed_total{{job="{JOB}",layer="1"}})', "phase")
    assert per_phase == {"prefill": expected_prefill, "decode": expected_decode}
    generated = prom.query(f'chiar_generation_tokens_total{{job="{JOB}"}}')
    assert float(generated[0]["value"][1]) == sum(4 + 3 * i for i in range(len(prompts)))

    # Quantile over every request since the server started (the buckets' cumulative counts).
    p90 = prom.query('histogram_quantile(0.9, sum by (le) (chiar_request_duration_seconds_bucket'
                     f'{{job="{JOB}",endpoint="/v1/generate",status="200"}}))')
    value = float(p90[0]["value"][1])
    # Linear interpolation inside a bucket: at most the upper bound of the bucket holding the slowest request.
    assert math.isfinite(value) and 0 < value <= 2.5 * max(latencies) + 0.005, (value, latencies)
    decode_p50 = prom.query('histogram_quantile(0.5, sum by (le) (chiar_forward_latency_seconds_bucket'
                            f'{{job="{JOB}",phase="decode"}}))')
    assert 0 < float(decode_p50[0]["value"][1]) < 1.0


def test_recording_rules_and_alerts_evaluate(stack: tuple[ServerProcess, Prometheus]) -> None:
    server, prom = stack
    post(server.url + "/v1/generate", {"prompt": "The tower", "max_new_tokens": 6, "temperature": 0.0})
    direct = parse(http_get(server.url + "/metrics")[1].decode())
    total_expr = f'sum(chiar_tokens_routed_total{{job="{JOB}"}})'
    prom.wait_for(lambda: float(prom.query(total_expr)[0]["value"][1]) == sum(direct.routed.values()), 20, "scrape")
    expected_share = direct.routing_share()["attention"]
    prom.wait_for(lambda: abs(float(prom.query(f'chiar:routing_attention_share:rate10m{{job="{JOB}"}}')[0]["value"][1])
                              - expected_share) < 1e-6, 20, "the recording rule to match the server's routing share")
    saved = float(prom.query(f'chiar:flops_saved_ratio:rate5m{{job="{JOB}"}}')[0]["value"][1])
    assert 0 < saved < 1  # hard gating executes fewer FLOPs than the dense baseline

    status, body = http_get(prom.url + "/api/v1/rules", timeout=10)
    assert status == 200
    groups = json.loads(body)["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 8
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
    assert not bad


def test_every_dashboard_query_runs_in_prometheus(stack: tuple[ServerProcess, Prometheus]) -> None:
    _, prom = stack
    dash = json.loads((ROOT / "deploy/grafana/dashboards/chiar-former.json").read_text())
    empty = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$model", ".*")
            if not prom.query(expr):  # raises on a PromQL error
                empty.append(panel["title"])
    # Errors-by-reason has no series until a request fails; everything else has data by now.
    assert set(empty) <= {"Errors by reason"}, empty
