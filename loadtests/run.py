"""Headless load-test runner (`make loadtest`): server on loopback, locust, summary.

    python -m loadtests.run [--checkpoint DIR] [--users 16] [--spawn-rate 4] [--run-time 60s]
                            [--scenario mixed|stress|mixed-flood] [--out DIR] [--host URL]

Starts `python -m server` on 127.0.0.1 (unless --host names a running one), scrapes /metrics,
runs locust headless with loadtests/locustfile.py, scrapes /metrics again, stops the server and
writes into --out: locust's final JSON stats (locust_final.json) and CSVs (locust_stats.csv, ...), its HTML report (report.html),
server.log, and summary.md / summary.json (requests/s, p50/p95/p99 per endpoint, failures,
generated tokens/s, attention/DCT routing share before and after).

The stress scenario shrinks the server's queue, removes think time and counts a 503 with
Retry-After as shed load; it then checks that no other 5xx occurred, no request took longer
than the configured timeout, the server's RSS stayed bounded and a normal request right after
the load succeeds within a second.

The mixed-flood scenario (loadtests/flood_locustfile.py) runs long streams, a perplexity flood and
1-token requests at once; its summary reports per class the streams' inter-token latency (client
side), the short requests' latency, the flood's scored tokens/s and the failures, and checks that
nothing failed except shed load and that every stream completed (loadtests/flood.py).

The exit status is non-zero when locust saw failures or a check failed. Entries of request type
"SSE" (a stream's TTFT and ITL, see the locustfile) are measurements, not requests: they are left
out of the aggregate row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests import flood
from loadtests.metrics_snapshot import Snapshot, parse
from loadtests.rss import RssSampler
from loadtests.server_process import ROOT, ServerProcess, http_get

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
FLOOD_LOCUSTFILE = Path(__file__).resolve().parent / "flood_locustfile.py"
DERIVED_TYPE = "SSE"  # = locustfile.DERIVED (not imported: importing locust patches the process with gevent)
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "chiar-small"
STRESS_SERVER_ENV = {"CHIAR_QUEUE_SIZE": "4", "CHIAR_MAX_BATCH_SIZE": "4", "CHIAR_REQUEST_TIMEOUT": "20"}


@dataclass
class Endpoint:
    """One row of locust's stats."""

    name: str
    request_type: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Summary:
    """What a run produced; written as summary.json and summary.md."""

    scenario: str
    users: int
    spawn_rate: float
    run_time: str
    wall_seconds: float
    locust_exit_code: int
    endpoints: list[Endpoint]
    total: Endpoint
    generated_tokens: float
    generated_tokens_per_s: float
    prompt_tokens: float
    routing_share_before: dict[str, float] | None
    routing_share_after: dict[str, float] | None
    routing_share_during: dict[str, float] | None
    rss_mb: dict[str, float] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    flood: flood.FloodSummary | None = None

    @property
    def processed_tokens_per_s(self) -> float:
        """Generated plus prompt and scored tokens per second: all the work the engine did."""
        return (self.generated_tokens + self.prompt_tokens) / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def ok(self) -> bool:
        """Zero failures and every check passed."""
        return (self.locust_exit_code == 0 and self.total.failures == 0
                and all(c["ok"] for c in self.checks.values()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint the server loads")
    p.add_argument("--host", default=None, help="target an already running server instead of starting one")
    p.add_argument("--users", type=int, default=None, help="concurrent users (default 16, stress 48, mixed-flood 12)")
    p.add_argument("--spawn-rate", type=float, default=None,
                   help="users started per second (default 4, stress 48, mixed-flood = users)")
    p.add_argument("--run-time", default="60s", help="locust run time, e.g. 60s, 2m")
    p.add_argument("--scenario", choices=("mixed", "stress", "mixed-flood"), default="mixed")
    p.add_argument("--wait", default=None, help="think time 'MIN,MAX' seconds (default 0.5,2; stress 0,0)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra CHIAR_* setting for the started server (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/loadtest/<time>)")
    p.add_argument("--max-rss-growth-mb", type=float, default=512.0, help="stress check: allowed RSS growth")
    p.add_argument("--user-classes", nargs="*", default=[], help="locust user classes to run (default all)")
    p.add_argument("--stop-timeout", type=float, default=None,
                   help="seconds users may finish their task after the run time (default 30, mixed-flood 120)")
    args = p.parse_args(argv)
    stress = args.scenario == "stress"
    args.users = args.users or {"stress": 48, "mixed-flood": 12}.get(args.scenario, 16)
    args.spawn_rate = args.spawn_rate or (48.0 if stress else float(args.users) if args.scenario == "mixed-flood" else 4.0)
    args.stop_timeout = args.stop_timeout or (120.0 if args.scenario == "mixed-flood" else 30.0)
    args.wait = args.wait or ("0,0" if stress else "0.5,2")
    args.out = args.out or ROOT / "runs" / "loadtest" / time.strftime("%Y%m%d-%H%M%S")
    return args


def scrape(url: str) -> Snapshot:
    """Parse GET url/metrics."""
    status, body = http_get(url + "/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    return parse(body.decode())


def run_locust(args: argparse.Namespace, url: str, env: dict[str, str]) -> int:
    """Run locust headless as a subprocess; returns its exit code."""
    locustfile = FLOOD_LOCUSTFILE if args.scenario == "mixed-flood" else LOCUSTFILE
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--headless",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
        "--host",
        url,
        "--csv",
        str(args.out / "locust"),
        "--html",
        str(args.out / "report.html"),
        "--json-file",
        str(args.out / "locust_final"),
        "--stop-timeout",
        f"{args.stop_timeout:g}",
        "--only-summary",
        "--loglevel",
        "WARNING",
        *args.user_classes,
    ]
    with (args.out / "locust.log").open("wb") as log:
        return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def read_stats(path: Path) -> tuple[list[Endpoint], Endpoint]:
    """Per-endpoint rows and the aggregate of the requests (not the SSE-derived entries) from locust's
    final JSON stats (`--json-file`).

    The CSV is written before users finish their last task during `--stop-timeout`, so its counts can
    lag the final ones (and the server's own counters); the JSON holds the final stats.
    """
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise RuntimeError(f"{path}: not locust's JSON stats")
    if not entries:
        raise RuntimeError(f"{path}: no requests were made")
    # req/s over the whole run, as locust's own table reports it
    duration = max(e["last_request_timestamp"] or 0 for e in entries) - min(e["start_time"] for e in entries)
    requests = [e for e in entries if e["method"] != DERIVED_TYPE]
    return ([_endpoint(e["name"], e["method"], [e], duration) for e in entries], _endpoint("Aggregated", "", requests, duration))


def _endpoint(name: str, request_type: str, entries: list[dict[str, Any]], duration: float) -> Endpoint:
    """One row from one or more locust StatsEntry dicts (histograms merged)."""
    histogram: dict[float, int] = {}
    for e in entries:
        for ms, count in e["response_times"].items():
            histogram[float(ms)] = histogram.get(float(ms), 0) + count
    requests = sum(e["num_requests"] for e in entries)

    def percentile(q: float) -> float:
        seen, need = 0, q * sum(histogram.values())
        for ms in sorted(histogram):
            seen += histogram[ms]
            if seen >= need:
                return ms
        return float("nan")

    return Endpoint(
        name=name,
        request_type=request_type,
        requests=requests,
        failures=sum(e["num_failures"] for e in entries),
        rps=requests / duration if duration > 0 else float("nan"),
        p50_ms=percentile(0.5),
        p95_ms=percentile(0.95),
        p99_ms=percentile(0.99),
        max_ms=max((e["max_response_time"] or 0 for e in entries), default=0.0),
    )


def timed_request(url: str) -> tuple[int, float]:
    """One normal /v1/generate request: (status, seconds)."""
    data = json.dumps({"prompt": "The city of", "max_new_tokens": 8, "temperature": 0.0}).encode()
    req = urllib.request.Request(url + "/v1/generate", data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.perf_counter() - start


def stress_checks(
    summary: Summary, url: str, server_env: dict[str, str], rss: list[float], max_growth_mb: float, during: Snapshot
) -> dict[str, dict[str, Any]]:
    """The stress scenario's pass/fail checks (the load has already stopped)."""
    status, seconds = timed_request(url)
    shed = sum(e.requests for e in summary.endpoints if e.name.endswith("[503 shed]"))
    timeout_ms = float(server_env.get("CHIAR_REQUEST_TIMEOUT", "120")) * 1000
    slowest = max((e.max_ms for e in summary.endpoints), default=0.0)
    growth = (max(rss) - rss[0]) if rss else float("nan")
    return {
        "excess_shed_with_503": {"ok": shed > 0, "detail": f"{shed} requests answered 503 + Retry-After"},
        "no_other_errors": {
            "ok": summary.total.failures == 0,
            "detail": f"{summary.total.failures} failures (other statuses or bad content)",
        },
        "server_counts_agree": {
            "ok": during.errors.get("overloaded", 0) == shed and not during.errors.get("internal", 0),
            "detail": f"server counted {during.errors.get('overloaded', 0):.0f} overloaded and "
            f"{during.errors.get('internal', 0):.0f} internal errors",
        },
        "no_wait_beyond_timeout": {
            "ok": slowest <= timeout_ms + 1000,
            "detail": f"slowest request {slowest:.0f} ms, timeout {timeout_ms:.0f} ms",
        },
        "rss_bounded": {
            "ok": bool(rss) and growth <= max_growth_mb,
            "detail": f"RSS {rss[0] if rss else 0:.0f} -> peak {max(rss, default=0):.0f} MiB "
            f"(growth {growth:.0f}, bound {max_growth_mb:.0f})",
        },
        "recovers_within_1s": {
            "ok": status == 200 and seconds < 1.0,
            "detail": f"normal request after the load: HTTP {status} in {seconds * 1000:.0f} ms",
        },
    }


def markdown(s: Summary) -> str:
    """summary.md text."""
    lines = [
        f"# Load test: {s.scenario}",
        "",
        f"{s.users} users, spawn rate {s.spawn_rate}/s, run time {s.run_time} ({s.wall_seconds:.1f} s wall), "
        f"locust exit code {s.locust_exit_code}.",
        "",
        "| endpoint | type | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in [*s.endpoints, s.total]:
        lines.append(
            f"| {e.name} | {e.request_type} | {e.requests} | {e.failures} | {e.rps:.2f} | {e.p50_ms:.0f} "
            f"| {e.p95_ms:.0f} | {e.p99_ms:.0f} | {e.max_ms:.0f} |"
        )
    lines += [
        "",
        f"Generated tokens: {s.generated_tokens:.0f} ({s.generated_tokens_per_s:.1f} tokens/s); "
        f"prompt/scored tokens: {s.prompt_tokens:.0f}; processed (both): {s.processed_tokens_per_s:.1f} tokens/s.",
        "",
    ]
    for label, share in (("before", s.routing_share_before), ("after", s.routing_share_after), ("during the run", s.routing_share_during)):
        text = ", ".join(f"{op} {v:.1%}" for op, v in share.items() if v) if share else "no routing-layer tokens"
        lines.append(f"- Routing share in routing layers {label}: {text}")
    if s.rss_mb:
        lines.append(f"- Server RSS: {s.rss_mb}")
    if s.flood:
        lines += ["", "## Per class", "", *flood.markdown(s.flood)]
    if s.checks:
        lines += ["", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {k} | {'ok' if v['ok'] else 'FAILED'} | {v['detail']} |" for k, v in s.checks.items()]
    lines += ["", f"Result: {'PASS' if s.ok else 'FAIL'}", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Summary:
    """Do one run; writes the outputs and returns the summary."""
    args.out.mkdir(parents=True, exist_ok=True)
    stress, flooded = args.scenario == "stress", args.scenario == "mixed-flood"
    server_env = {**(STRESS_SERVER_ENV if stress else {}), **dict(kv.split("=", 1) for kv in args.server_env)}
    counts_path = args.out / "flood_counts.json"
    counts_path.unlink(missing_ok=True)
    locust_env = {
        "CHIAR_LOADTEST_WAIT": args.wait,
        "CHIAR_LOADTEST_SHED": "1" if stress or flooded else "",
        "CHIAR_LOADTEST_COUNTS": str(counts_path),
    }
    server = None
    if args.host:
        url = args.host.rstrip("/")
    else:
        server = ServerProcess(args.checkpoint, env=server_env, log_path=args.out / "server.log").start()
        url = server.url
    sampler = RssSampler(server.pid) if server else None
    try:
        before = scrape(url)
        if sampler:
            sampler.start()
        start = time.monotonic()
        code = run_locust(args, url, locust_env)
        wall = time.monotonic() - start
        rss = sampler.stop() if sampler else []
        after = scrape(url)
        endpoints, total = read_stats(args.out / "locust_final.json")
        during = after.minus(before)
        summary = Summary(
            scenario=args.scenario,
            users=args.users,
            spawn_rate=args.spawn_rate,
            run_time=args.run_time,
            wall_seconds=wall,
            locust_exit_code=code,
            endpoints=endpoints,
            total=total,
            generated_tokens=during.generation_tokens,
            generated_tokens_per_s=during.generation_tokens / wall,
            prompt_tokens=during.prompt_tokens,
            routing_share_before=before.routing_share(),
            routing_share_after=after.routing_share(),
            routing_share_during=during.routing_share(),
            rss_mb={"start": rss[0], "peak": max(rss), "end": rss[-1]} if rss else {},
        )
        if stress:
            summary.checks = stress_checks(summary, url, server_env, rss, args.max_rss_growth_mb, during)
        if flooded:
            summary.flood = flood.summarise(endpoints, flood.FloodCounts.read(counts_path))
            summary.checks = flood.checks(summary.flood, total.failures)
    finally:
        if sampler and sampler.is_alive():
            sampler.stop()
        if server:
            server.stop()
    (args.out / "summary.json").write_text(json.dumps({**asdict(summary), "ok": summary.ok}, indent=2) + "\n")
    (args.out / "summary.md").write_text(markdown(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 0 only for a clean run."""
    args = parse_args(argv)
    summary = run(args)
    print(markdown(summary))
    print(f"outputs in {args.out}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
