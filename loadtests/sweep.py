"""Latency and throughput vs concurrency for one or more checkpoints (issue 6, BENCHMARKS.md).

    python -m loadtests.sweep --checkpoint checkpoints/chiar-small --checkpoint checkpoints/baseline-small \
        [--users 1 4 16 64] [--run-time 30s] [--out runs/sweep] [--write BENCHMARKS.md]

For each checkpoint one server is started on loopback; locust runs the mixed traffic without think
time (closed loop) at each concurrency. Writes sweep.md (table), sweep.json and sweep.png (p50/p99
latency of /v1/generate and requests/s vs users) into --out; with --write it replaces the section
between the loadtest-sweep markers of that file (appending it when absent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.report import machine_line, write_section
from loadtests.run import ROOT, parse_args, run
from loadtests.server_process import ServerProcess

SECTION = "loadtest-sweep"


def sweep(checkpoints: list[Path], users: list[int], run_time: str, out: Path) -> list[dict[str, Any]]:
    """Run every (checkpoint, users) pair; one row per pair."""
    rows = []
    for ckpt in checkpoints:
        with ServerProcess(ckpt, log_path=out / f"{ckpt.name}-server.log") as server:
            for n in users:
                s = run(parse_args(["--host", server.url, "--users", str(n), "--spawn-rate", str(n),
                                    "--run-time", run_time, "--wait", "0,0", "--out", str(out / f"{ckpt.name}-u{n}")]))
                gen = next((e for e in s.endpoints if e.name == "/v1/generate"), s.total)
                rows.append({"checkpoint": ckpt.name, "users": n, "rps": s.total.rps, "failures": s.total.failures,
                             "generate_p50_ms": gen.p50_ms, "generate_p99_ms": gen.p99_ms,
                             "all_p50_ms": s.total.p50_ms, "all_p99_ms": s.total.p99_ms,
                             "tokens_per_s": s.generated_tokens_per_s, "processed_per_s": s.processed_tokens_per_s,
                             "attention_share": (s.routing_share_during or {}).get("attention")})
    return rows


def table(rows: list[dict[str, Any]], run_time: str) -> str:
    """Markdown section with machine, date and commit."""
    lines = ["## Server load: latency and throughput vs concurrency", "",
             f"Machine: {machine_line()}. Locust mixed traffic (loadtests/locustfile.py) without "
             f"think time, {run_time} per row, CPU.", "",
             "![latency and throughput vs users](docs/img/loadtest_sweep.png)", "",
             "| checkpoint | users | req/s | processed tokens/s (generated + scored) | generated tokens/s | /v1/generate p50 ms "
             "| p99 ms | all p50 ms | all p99 ms | failures | attention share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = f"{r['attention_share']:.1%}" if r["attention_share"] is not None else "-"
        lines.append(f"| {r['checkpoint']} | {r['users']} | {r['rps']:.2f} | {r['processed_per_s']:.1f} | {r['tokens_per_s']:.1f} "
                     f"| {r['generate_p50_ms']:.0f} | {r['generate_p99_ms']:.0f} | {r['all_p50_ms']:.0f} "
                     f"| {r['all_p99_ms']:.0f} | {r['failures']} | {share} |")
    return "\n".join([*lines, ""])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """p50/p99 latency and req/s vs users, one line per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["checkpoint"] for r in rows):
        rs = [r for r in rows if r["checkpoint"] == name]
        xs = [r["users"] for r in rs]
        lat.plot(xs, [r["generate_p50_ms"] for r in rs], "o-", label=f"{name} p50")
        lat.plot(xs, [r["generate_p99_ms"] for r in rs], "s--", label=f"{name} p99")
        thr.plot(xs, [r["rps"] for r in rs], "o-", label=name)
    for ax, ylabel in ((lat, "/v1/generate latency (ms)"), (thr, "requests/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent users")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m loadtests.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, action="append", required=True)
    p.add_argument("--users", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--run-time", default="30s")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep")
    p.add_argument("--write", type=Path, default=None, help="markdown file to update (e.g. BENCHMARKS.md)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = sweep(args.checkpoint, args.users, args.run_time, args.out)
    section = table(rows, args.run_time)
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "sweep.md").write_text(section)
    plot(rows, args.out / "sweep.png")
    if args.write:
        write_section(args.write, SECTION, section)
        (args.write.parent / "docs" / "img").mkdir(parents=True, exist_ok=True)
        plot(rows, args.write.parent / "docs" / "img" / "loadtest_sweep.png")
    print(section)
    return 0 if all(r["failures"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
