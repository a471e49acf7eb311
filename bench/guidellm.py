"""guidellm (vLLM's load generator, a tool nobody here wrote) against a real server, beside the server's own
figures for the same run: `make bench-guidellm` writes the `bench-guidellm` section of BENCHMARKS.md.

For each request format (completions, chat) and concurrency, guidellm runs synthetic prompts of a fixed token
count (counted by the checkpoint's own tokenizer files, as a user would point guidellm at them) with a fixed
output length, streaming. "Ours" is what the server measured for the same requests: the means of its
`chiar_time_to_first_token_seconds` / `chiar_inter_token_latency_seconds` histograms and its generated
tokens over guidellm's run time. guidellm runs from its own venv (make setup-guidellm).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.report import fmt, machine_line, write_section
from loadtests.metrics_snapshot import Samples, samples
from loadtests.server_process import ROOT, ServerProcess

SECTION = "bench-guidellm"
FORMATS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class Report:
    """The figures of one guidellm benchmark (its JSON report), successful requests only."""

    successful: int
    errored: int
    incomplete: int
    prompt_tokens: float  # mean per request, as guidellm counted them
    output_tokens: float
    ttft_ms: float  # median
    ttft_mean_ms: float
    ttft_p95_ms: float
    itl_ms: float  # mean over all inter-token gaps
    output_tokens_per_s: float  # mean, as guidellm's "Server Throughput" table
    requests_per_s: float
    duration_s: float


def guidellm_command(guidellm: str, url: str, checkpoint: Path, request_format: str, *, requests: int, prompt_tokens: int,
                     output_tokens: int, concurrency: int, out: Path) -> list[str]:
    """The guidellm command line of one benchmark (the README's, with a profile, a size and a JSON report)."""
    profile = "kind=synchronous" if concurrency == 1 else f"kind=concurrent,streams={concurrency}"
    return [guidellm, "run", "--backend", f"kind=openai_http,target={url},request_format={request_format}",
            "--tokenizer", f"kind=hf_auto,model={checkpoint}",
            "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
            "--profile", profile, "--constraint", f"kind=max_requests,count={requests}",
            "--output", f"kind=json,path={out}", "--disable-console-interactive"]


def parse_report(path: Path) -> Report:
    """The one benchmark of a guidellm JSON report."""
    (bench,) = json.loads(path.read_text())["benchmarks"]
    m = bench["metrics"]

    def ok(name: str) -> dict:
        return m[name]["successful"]

    totals = m["request_totals"]
    return Report(successful=totals["successful"], errored=totals["errored"], incomplete=totals["incomplete"],
                  prompt_tokens=ok("prompt_token_count")["mean"], output_tokens=ok("output_token_count")["mean"],
                  ttft_ms=ok("time_to_first_token_ms")["median"], ttft_mean_ms=ok("time_to_first_token_ms")["mean"],
                  ttft_p95_ms=ok("time_to_first_token_ms")["percentiles"]["p95"],
                  itl_ms=ok("inter_token_latency_ms")["mean"], output_tokens_per_s=ok("output_tokens_per_second")["mean"],
                  requests_per_s=ok("requests_per_second")["mean"], duration_s=bench["duration"])


def run_guidellm(command: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """guidellm in `cwd` (it writes its report there); a non-zero exit raises with its output's tail."""
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"guidellm exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@dataclass(frozen=True)
class Ours:
    """What the server measured over the same requests."""

    ttft_ms: float  # mean
    itl_ms: float  # mean
    output_tokens_per_s: float


def scrape(url: str) -> Samples:
    return samples(httpx.get(url + "/metrics", timeout=10).text)


def server_figures(before: Samples, after: Samples, duration_s: float) -> Ours:
    def total(scraped: Samples, name: str) -> float:  # sum over every label set
        return sum(value for (sample, _), value in scraped.items() if sample == name)

    def delta(name: str) -> float:
        return total(after, name) - total(before, name)

    def mean_ms(histogram: str) -> float:
        count = delta(histogram + "_count")
        return 1000 * delta(histogram + "_sum") / count if count else float("nan")

    return Ours(mean_ms("chiar_time_to_first_token_seconds"), mean_ms("chiar_inter_token_latency_seconds"),
                delta("chiar_generation_tokens_total") / duration_s)


def bench_one(guidellm: str, server: ServerProcess, checkpoint: Path, name: str, concurrency: int,
              args: argparse.Namespace, work: Path) -> dict:
    out = work / f"{name}-{concurrency}.json"
    command = guidellm_command(guidellm, server.url, checkpoint, FORMATS[name], requests=args.requests,
                               prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, concurrency=concurrency, out=out)
    before = scrape(server.url)
    run_guidellm(command, work)
    report = parse_report(out)
    return {"format": name, "concurrency": concurrency, "report": report,
            "ours": server_figures(before, scrape(server.url), report.duration_s)}


def shown_path(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = ["## guidellm against the server (`make bench-guidellm`)", "", f"Machine: {machine_line()}.",
             f"Checkpoint `{shown_path(args.checkpoint)}`; guidellm 0.8.1 (own venv, requirements-guidellm.txt), streaming, "
             f"synthetic prompts of {args.prompt_tokens} tokens (the checkpoint's tokenizer files), {args.output_tokens} "
             f"output tokens (`ignore_eos`), {args.requests} requests per row. guidellm's figures are measured by its client; "
             "ours are the server's own histograms (`chiar_time_to_first_token_seconds`, `chiar_inter_token_latency_seconds`) "
             "and generated tokens over the same run. TTFT and ITL in ms.", "",
             "| format | concurrency | ok | errors | prompt tok | output tok | TTFT mean (guidellm) | TTFT mean (server) "
             "| TTFT p50 (guidellm) | TTFT p95 (guidellm) | ITL mean (guidellm) | ITL mean (server) | output tok/s (guidellm) "
             "| output tok/s (server) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        r, o = row["report"], row["ours"]
        lines.append(f"| {row['format']} | {row['concurrency']} | {r.successful} | {r.errored + r.incomplete} | "
                     f"{fmt(r.prompt_tokens)} | {fmt(r.output_tokens)} | {fmt(r.ttft_mean_ms)} | {fmt(o.ttft_ms)} | "
                     f"{fmt(r.ttft_ms)} | {fmt(r.ttft_p95_ms)} | {fmt(r.itl_ms)} | {fmt(o.itl_ms)} | "
                     f"{fmt(r.output_tokens_per_s)} | {fmt(o.output_tokens_per_s)} |")
    lines += ["", "Prompt tokens are guidellm's count (BOS and, for chat, the template's turn text included, as the server "
              "counts them in `usage`). TTFT: the server's clock starts when the request reaches the engine, guidellm's "
              "when it sends the request, so guidellm's adds HTTP, tokenization and the first SSE event. ITL: both are "
              "the mean gap between a request's tokens. Output tok/s (server) is the server's generated-token counter "
              "over guidellm's run time: equal to guidellm's figure, it says guidellm's per-request counts (from the "
              "streamed usage) are the tokens the server generated."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guidellm", default=str(ROOT / ".venv-guidellm" / "bin" / "guidellm"))
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "chiar-small")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated guidellm streams")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--write", type=Path, help="BENCHMARKS.md to update (section bench-guidellm)")
    args = parser.parse_args(argv)
    if not Path(args.guidellm).is_file():
        parser.error(f"--guidellm: {args.guidellm} not found; run `make setup-guidellm`")
    args.guidellm = str(Path(args.guidellm).resolve())  # guidellm runs in a temporary directory
    args.checkpoint = args.checkpoint.resolve()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-guidellm-") as tmp:
        work = Path(tmp)
        server = ServerProcess(args.checkpoint, work / "server.log").start()
        try:
            for name in FORMATS:
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    rows.append(bench_one(args.guidellm, server, args.checkpoint, name, concurrency, args, work))
                    r = rows[-1]["report"]
                    print(f"{name} x{concurrency}: {r.successful} ok, {r.errored} errors, TTFT p50 {r.ttft_ms:.1f} ms")
        finally:
            server.stop()
    body = render(rows, args)
    print(body)
    if args.write:
        write_section(args.write, SECTION, body)
    return 0 if all(row["report"].errored + row["report"].incomplete == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
