"""Long-context rows of `make bench-server` (issue 12 item 4): 1-2k-token prompts, CHIAR vs baseline.

Per model one real server (the same settings as the other rows); per prompt length and client count:
perplexity = `/v1/perplexity` of WikiText-2 test spans of that many tokens (scored tokens/s), and
generate = streamed `/v1/generate` continuing such spans (TTFT, ITL, generated tokens/s).
Checkpoints whose context is too short for the longest prompt are replaced by random-weight ones
at `--long-context` (bench.checkpoints.random_checkpoints), and the table says so.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import httpx

from bench import compare
from bench.load import Sample, closed_loop, generate_once, perplexity_once
from bench.longtext import context_of, long_texts
from bench.report import fmt
from loadtests.server_process import ServerProcess

SECTION = "bench-server-long"
TARGET = 1.25  # CHIAR / baseline scored tokens/s for long documents


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--long-only", action="store_true", help="only the long-context rows")
    p.add_argument("--no-long", action="store_true", help="skip the long-context rows")
    p.add_argument("--long-lengths", type=int, nargs="+", default=[1024, 2000], help="prompt lengths in tokens (BOS excluded)")
    p.add_argument("--long-clients", type=int, nargs="+", default=[1, 4])
    p.add_argument("--long-requests", type=int, default=8, help="requests per level")
    p.add_argument("--long-new-tokens", type=int, default=32)
    p.add_argument("--long-context", type=int, default=2048, help="context of the random-weight stand-ins")


def quick(args: argparse.Namespace) -> None:
    args.long_lengths, args.long_clients, args.long_requests, args.long_new_tokens = [400], [1, 2], 2, 8
    args.long_context = 512


def checkpoints(names: dict[str, Path], args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Path], bool]:
    """The checkpoints for the long rows, and whether they are random-weight stand-ins."""
    need = max(args.long_lengths) + 1 + args.long_new_tokens
    if not args.random and all((p / "config.json").is_file() and context_of(p) >= need for p in names.values()):
        return names, False
    from bench.checkpoints import random_checkpoints

    context = max(args.long_context, need)
    print(f"long rows: a checkpoint's context is under {need} tokens; building random-weight ones at context {context} ...", flush=True)
    chiar, baseline = random_checkpoints(tmp / "long", max_seq_len=context)
    return {"CHIAR": chiar, "baseline": baseline}, True


def bench_long(name: str, checkpoint: Path, args: argparse.Namespace, log_dir: Path) -> list[dict]:
    env = dict(compare.OUR_ENV)
    if args.threads:
        env["CHIAR_THREADS"] = str(args.threads)
    n_texts = max(max(args.long_clients), args.long_requests)
    texts = {n: long_texts(checkpoint, n, n_texts) for n in args.long_lengths}
    server = ServerProcess(checkpoint, env=env, log_path=log_dir / f"{name}-long.log").start(ready_timeout=300)
    rows = []
    try:
        for n in args.long_lengths:
            for clients in args.long_clients:
                per_client = max(1, args.long_requests // clients)

                async def gen(client: httpx.AsyncClient, i: int, n: int = n) -> Sample:
                    return await generate_once(client, texts[n][i % n_texts], args.long_new_tokens, seed=i)

                async def ppl(client: httpx.AsyncClient, i: int, n: int = n) -> Sample:
                    return await perplexity_once(client, texts[n][i % n_texts])

                for workload, make in (("perplexity", ppl), ("generate", gen)):
                    row = {"model": name, "workload": workload, "prompt_tokens": n,
                           **asyncio.run(closed_loop(server.url, clients, per_client, make))}
                    rows.append(row)
                    print(f"{name:>9} long {workload:>10} n={n:<5} c={clients:<2} {row['tokens_per_s']:9.1f} tok/s "
                          f"ttft p50 {row['ttft_p50']:8.1f} ms itl p50 {row['itl_p50']:7.1f} ms", flush=True)
    finally:
        server.stop()
    return rows


def run(names: dict[str, Path], args: argparse.Namespace, tmp: Path) -> tuple[list[dict], dict[str, Path], bool]:
    used, random = checkpoints(names, args, tmp)
    rows = [row for name, path in used.items() for row in bench_long(name, path, args, tmp)]
    return rows, used, random


def render(rows: list[dict], used: dict[str, Path], random: bool, args: argparse.Namespace, machine: str) -> str:
    """The long-context section (its own BENCHMARKS.md block, so `--long-only` rewrites only it)."""
    stand_in = " (random-weight stand-ins: the given checkpoints' context is too short)" if random else ""
    lines = ["## Server at long context: 1-2k-token prompts, CHIAR vs baseline (`make bench-server`)", "",
             f"Machine: {machine}; {args.threads or 'default'} torch threads per server process.",
             "Checkpoints: " + ", ".join(f"{k} = `{v}`" for k, v in used.items()) + stand_in + ".",
             "perplexity = `/v1/perplexity` of WikiText-2 test spans of the given token count (tokens/s = scored tokens); "
             f"generate = streamed `/v1/generate` continuing them, {args.long_new_tokens} new tokens (tokens/s = generated). "
             "TTFT and ITL (per request, the mean gap between streamed tokens after the first) in ms, p50 over requests.", "",
             "| prompt tokens | workload | clients | CHIAR tokens/s | baseline tokens/s | CHIAR / baseline | "
             "TTFT p50 CHIAR | TTFT p50 baseline | ITL p50 CHIAR | ITL p50 baseline |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keyed = {(r["model"], r["workload"], r["prompt_tokens"], r["clients"]): r for r in rows}
    scoring: list[tuple[int, int, float]] = []
    for (model, workload, n, clients), c in keyed.items():
        b = keyed.get(("baseline", workload, n, clients))
        if model != "CHIAR" or b is None:
            continue
        ratio = c["tokens_per_s"] / b["tokens_per_s"]
        if workload == "perplexity":
            scoring.append((n, clients, ratio))
        timing = (f"{fmt(c['ttft_p50'])} | {fmt(b['ttft_p50'])} | {fmt(c['itl_p50'])} | {fmt(b['itl_p50'])}"
                  if workload == "generate" else "- | - | - | -")
        lines.append(f"| {n} | {workload} | {clients} | {c['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | {ratio:.2f}x | {timing} |")
    if scoring:
        n, clients, ratio = max(scoring)
        lines += ["", f"- long-document scoring, CHIAR / baseline scored tokens/s ({n}-token texts, {clients} clients): "
                      f"**{ratio:.2f}x** (target >= {TARGET}x: {'met' if ratio >= TARGET else 'not met'})"]
    return "\n".join(lines) + "\n"
