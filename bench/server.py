"""`make bench-server` (`python -m bench.server`): the HTTP server under load, and beside its peers.

1. For each checkpoint a real `python -m server` process on loopback serves closed-loop clients
   (1, 8, 32 by default; each sends its requests back to back): streamed /v1/generate (TTFT from
   the first SSE token event) and /v1/perplexity. Reported per level: requests/s, tokens/s,
   latency and TTFT p50/p95/p99. The reference is a sequential loop over HuggingFace transformers'
   `LlamaForCausalLM.generate` of the same size (random weights), on the same prompts. The routing
   overhead (DCT + entropy of the routing layers) is timed separately, in process.
2. Peers (bench/compare.py): our server with each checkpoint, `transformers serve
   --continuous-batching` and, with --llamacpp, llama.cpp's `llama-server` (built once from the
   llama-cpp-python sdist, bench/llamacpp.py), on one workload: non-streamed /v1/completions,
   24-word prompts, 32 new tokens; tokens/s, latency and peak RSS per level.
3. Long context (bench/server_long.py, its own section): 1024- and 2000-token prompts, CHIAR vs
   baseline side by side: scored tokens/s of /v1/perplexity, TTFT and ITL of streamed generation.

    python -m bench.server [--chiar DIR] [--baseline DIR] [--clients 1 8 32] [--llamacpp] [--quick]
                           [--long-only | --no-long] [--write BENCHMARKS.md]

Without checkpoints (default: checkpoints/chiar-small, checkpoints/baseline-small) it builds
random-weight ones of chiar-small's size, CHIAR thresholds at each routing layer's median entropy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import compare, server_long
from bench.checkpoints import random_checkpoints
from bench.load import Sample, closed_loop_for, generate_once, perplexity_once, summarise
from bench.report import fmt, machine_line, median_seconds, relative, write_section
from loadtests.server_process import ROOT, ServerProcess

SECTION = "bench-server"


# ------------------------------------------------------------------------ load
def bench_server(name: str, checkpoint: Path, prompts: list[str], texts: list[str], args: argparse.Namespace, log_dir: Path) -> list[dict]:
    env = dict(compare.OUR_ENV)
    if args.threads:
        env["CHIAR_THREADS"] = str(args.threads)
    server = ServerProcess(checkpoint, env=env, log_path=log_dir / f"{name}.log").start(ready_timeout=180)
    rows = []
    try:
        for clients in args.clients:
            per_client = max(args.min_requests // clients, args.requests_per_client)

            async def gen(client: httpx.AsyncClient, i: int) -> Sample:
                return await generate_once(client, prompts[i % len(prompts)], args.max_new_tokens, seed=i)

            async def ppl(client: httpx.AsyncClient, i: int) -> Sample:
                return await perplexity_once(client, texts[i % len(texts)])

            for workload, make in (("generate", gen), ("perplexity", ppl)):
                row = {"model": name, "workload": workload,
                       **asyncio.run(closed_loop_for(server.url, clients, per_client, make, args.min_seconds))}
                rows.append(row)
                print(f"{name:>9} {workload:>10} c={clients:<3} {row['req_per_s']:7.2f} req/s {row['tokens_per_s']:9.1f} tok/s "
                      f"p50 {row['lat_p50']:8.1f} ms p95 {row['lat_p95']:8.1f} ms ttft p50 {row['ttft_p50']:7.1f} ms", flush=True)
        flops = [line for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
                 if line.startswith("chiar_flops_total")]
        rows.append({"model": name, "workload": "flops", "lines": flops})
    finally:
        server.stop()
    return rows


# ------------------------------------------------------------------------ HF reference and routing overhead
def hf_sequential(checkpoint: Path, prompts: list[str], max_new_tokens: int, n: int, threads: int | None) -> dict[str, Any] | None:
    import torch

    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("transformers is not installed: skipping the HF reference", flush=True)
        return None
    from model import load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_checkpoint(checkpoint)
    cfg = model.config
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                                      max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                                      bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)).eval()
    results = []
    with torch.inference_mode():
        ids = torch.tensor([[cfg.bos_token_id, *tokenizer.encode(prompts[0], add_special_tokens=False).ids]])
        hf.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        start_all = time.perf_counter()
        for i in range(n):
            ids = torch.tensor([[cfg.bos_token_id, *tokenizer.encode(prompts[i % len(prompts)], add_special_tokens=False).ids]])
            start = time.perf_counter()
            hf(ids)  # prefill alone: the TTFT a sequential server would give
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
            results.append(Sample(time.perf_counter() - start, ttft, out.shape[1] - ids.shape[1]))
        wall = time.perf_counter() - start_all - sum(r.ttft for r in results)
    row = {"model": "HF Llama", "workload": "generate", **summarise(results, wall, 1)}
    row["params"] = sum(p.numel() for p in hf.parameters())
    return row


def routing_overhead(checkpoint: Path, batch: int, seq: int, repeats: int = 5) -> dict[str, float]:
    """Prefill time vs the routing work alone (spectral entropy, DCT included, in each routing layer) on the same tokens."""
    import torch

    from model import load_checkpoint, spectral_entropy

    model, _ = load_checkpoint(checkpoint)
    cfg = model.config
    seq = min(seq, cfg.max_seq_len)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    x = torch.randn(batch * seq, cfg.d_model)

    def timed(fn: Any) -> float:
        return median_seconds(fn, repeats) * 1000

    with torch.inference_mode():
        prefill = timed(lambda: model.infer(ids))
        routing = timed(lambda: [spectral_entropy(x) for _ in range(cfg.n_routing_layers)])
    return {"batch": batch, "seq": seq, "prefill_ms": prefill, "routing_ms": routing, "layers": cfg.n_routing_layers}


# ------------------------------------------------------------------------ report
def render(rows: list[dict], hf: dict | None, overhead: dict | None, args: argparse.Namespace, names: dict[str, Path],
           plot: Path | None, peers: compare.Comparison | None, work: compare.Workload) -> str:
    if not rows and hf is None and peers is not None:  # --peers-only
        return "\n".join(["## Server beside its peers (`python -m bench.server --peers-only`)", "",
                          f"Machine: {machine_line()}; {args.threads or 'default'} torch threads per server process.", "",
                          *compare.render(peers, work)])
    lines = ["## Server under load (`make bench-server`)", "",
             f"Machine: {machine_line()}; {args.threads or 'default'} torch threads per server process.",
             "Checkpoints: " + ", ".join(f"{k} = `{v}`" for k, v in names.items()) + ".",
             f"Closed-loop clients on loopback; generate = streamed `/v1/generate`, {args.max_new_tokens} new tokens "
             "(temperature 0.8, seeded, EOS ignored); perplexity = `/v1/perplexity` on WikiText-2 test paragraphs. "
             "Latency and TTFT in ms.", "",
             "| model | workload | clients | requests | req/s | tokens/s | latency p50 | p95 | p99 | TTFT p50 | p95 | p99 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    table = [r for r in rows if r["workload"] != "flops"] + ([hf] if hf else [])
    for r in table:
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['lat_p50']:.1f} | {r['lat_p95']:.1f} | {r['lat_p99']:.1f} | "
            f"{fmt(r['ttft_p50'])} | {fmt(r['ttft_p95'])} | {fmt(r['ttft_p99'])} |"
        )
    lines.append("")

    def pick(model: str, workload: str, clients: int) -> dict | None:
        return next((r for r in rows if r["model"] == model and r["workload"] == workload and r.get("clients") == clients), None)

    c8 = 8 if 8 in args.clients else max(args.clients)
    chiar, base = pick("CHIAR", "generate", c8), pick("baseline", "generate", c8)
    checks = []
    if chiar and hf:
        ratio = chiar["tokens_per_s"] / hf["tokens_per_s"]
        checks.append(
            f"- generated tokens/s at {c8} clients vs the sequential HF loop: **{ratio:.2f}x** "
            f"(target >= 3x: {'met' if ratio >= 3 else 'not met'})"
        )
    if chiar and base:
        ratio = chiar["tokens_per_s"] / base["tokens_per_s"]
        checks.append(
            f"- CHIAR vs baseline generated tokens/s at {c8} clients: **{ratio:.2f}x** "
            f"(target >= 1.2x: {'met' if ratio >= 1.2 else 'not met'})"
        )
        pc, pb = pick("CHIAR", "perplexity", c8), pick("baseline", "perplexity", c8)
        if pc and pb:
            checks.append(
                f"- CHIAR vs baseline scored tokens/s (perplexity) at {c8} clients: **{pc['tokens_per_s'] / pb['tokens_per_s']:.2f}x**"
            )
    if chiar:
        checks.append(
            f"- TTFT p50 at {c8} clients: **{chiar['ttft_p50']:.1f} ms** "
            f"(target < 100 ms: {'met' if chiar['ttft_p50'] < 100 else 'not met'})"
        )
    for r in rows:
        if r["workload"] == "flops":
            values = {line.split('"')[1]: float(line.split()[-1]) for line in r["lines"]}
            if values.get("dense_equivalent"):
                checks.append(
                    f"- {r['model']}: executed / dense-equivalent FLOPs over the run = "
                    f"{values['executed'] / values['dense_equivalent']:.3f}"
                )
    if overhead:
        checks.append(
            f"- routing overhead (DCT + entropy, {overhead['layers']} routing layers, "
            f"batch {overhead['batch']} x {overhead['seq']} tokens): "
            f"{overhead['routing_ms']:.2f} ms of a {overhead['prefill_ms']:.2f} ms CHIAR prefill "
            f"({100 * overhead['routing_ms'] / overhead['prefill_ms']:.0f}%)"
        )
    lines += ["Targets (measured, not asserted):", "", *checks, ""]
    if plot is not None:
        lines += [f"![latency vs concurrency]({os.path.relpath(plot, args.write.parent if args.write else ROOT)})", ""]
    if peers is not None:
        lines += compare.render(peers, work)
    return "\n".join(lines)


def make_plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for model, style, colour in (("CHIAR", "-o", "tab:blue"), ("baseline", "--s", "tab:red")):
        for ax, workload, key, title in (
            (axes[0], "generate", "lat", "generate latency"),
            (axes[1], "generate", "ttft", "time to first token"),
            (axes[2], "perplexity", "lat", "perplexity latency"),
        ):
            data = [r for r in rows if r["model"] == model and r["workload"] == workload]
            if not data:
                continue
            xs = [r["clients"] for r in data]
            for q, alpha in ((50, 1.0), (95, 0.6), (99, 0.3)):
                ax.plot(xs, [r[f"{key}_p{q}"] for r in data], style, color=colour, alpha=alpha, label=f"{model} p{q}")
            ax.set_title(title)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel("ms")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def workload_text(n_prompts: int) -> tuple[list[str], list[str]]:
    paragraphs = [
        p.strip() for p in (ROOT / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8").split("\n") if len(p.strip()) > 400
    ]
    prompts = [" ".join(p.split()[:24]) for p in paragraphs[:n_prompts]]
    texts = [" ".join(p.split()[:150]) for p in paragraphs[:n_prompts]]
    return prompts, texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chiar", type=Path, default=ROOT / "checkpoints" / "chiar-small")
    p.add_argument("--baseline", type=Path, default=ROOT / "checkpoints" / "baseline-small")
    p.add_argument("--random", action="store_true", help="use random-weight checkpoints of chiar-small's size even if trained ones exist")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=16, help="at least this many requests per level")
    p.add_argument("--min-seconds", type=float, default=2.0, help="a level that took less is measured again, about this long")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hf-requests", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (servers and HF loop); default: torch's choice")
    p.add_argument("--no-peers", action="store_true", help="skip the same-workload comparison with transformers serve")
    p.add_argument(
        "--llamacpp",
        action="store_true",
        help="add llama.cpp's server to the peers (builds it once from the llama-cpp-python sdist: minutes)",
    )
    p.add_argument("--peers-only", action="store_true", help="only the same-workload comparison with the peers")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 2 clients, few requests, no plot")
    p.add_argument("--write", type=Path, default=None, help="markdown file to update (BENCHMARKS.md)")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "bench_server_latency.png")
    p.add_argument("--json", type=Path, default=None, help="also dump raw rows as JSON")
    server_long.add_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.requests_per_client, args.min_requests, args.hf_requests, args.min_seconds = [1, 2], 2, 4, 4, 0.0
        server_long.quick(args)

    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    long_body = ""
    if not (args.peers_only or args.no_long):  # first: with --long-only the short rows' stand-ins are not needed
        given = {"CHIAR": args.chiar, "baseline": args.baseline}
        long_rows, long_used, long_random = server_long.run(given, args, tmp)
        long_body = server_long.render(long_rows, relative(long_used), long_random, args, machine_line())
    if args.long_only:
        print(long_body)
        if args.json:
            args.json.write_text(json.dumps({"long": long_rows}, indent=2))
        if args.write:
            write_section(args.write, server_long.SECTION, long_body)
            print(f"wrote {args.write}", flush=True)
        return 0
    if args.random or not (args.chiar / "config.json").is_file() or not (args.baseline / "config.json").is_file():
        print("building random-weight checkpoints of chiar-small's size ...", flush=True)
        args.chiar, args.baseline = random_checkpoints(tmp)
    names = {"CHIAR": args.chiar, "baseline": args.baseline}
    prompts, texts = workload_text(64)
    rows: list[dict] = []
    hf = overhead = None
    if not args.peers_only:
        for name, path in names.items():
            rows += bench_server(name, path, prompts, texts, args, tmp)
        hf = hf_sequential(args.chiar, prompts, args.max_new_tokens, args.hf_requests, args.threads)
        if hf:
            print(f"HF Llama sequential: {hf['tokens_per_s']:.1f} tok/s, p50 {hf['lat_p50']:.1f} ms", flush=True)
        overhead = routing_overhead(args.chiar, batch=8, seq=256)
    work = compare.Workload(
        prompts=prompts,
        max_tokens=args.max_new_tokens,
        levels=args.clients,
        requests_per_client=args.requests_per_client,
        min_requests=args.min_requests,
        min_seconds=args.min_seconds,
    )
    peers = None
    if not args.no_peers or args.peers_only:
        # the peer Llama takes baseline-small's shapes (CHIAR has the same ones plus its routers)
        peers = compare.run({"baseline": args.baseline, "CHIAR": args.chiar}, work, tmp, llama_cpp=args.llamacpp, threads=args.threads)
    plot = make_plot(rows, args.plot) if args.write and not args.quick else None
    body = render(rows, hf, overhead, args, relative(names), plot, peers, work)
    print(body)
    print(long_body)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "hf": hf,
                    "overhead": overhead,
                    "long": long_rows if long_body else None,
                    "peers": peers.rows if peers else None,
                    "peer_notes": peers.notes if peers else None,
                },
                indent=2,
            )
        )
    if args.write and args.peers_only:
        print("--peers-only: not writing a partial section", flush=True)
    elif args.write:
        write_section(args.write, SECTION, body)
        if long_body:
            write_section(args.write, server_long.SECTION, long_body)
        print(f"wrote {args.write}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
