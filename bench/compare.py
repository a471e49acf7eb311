"""Same workload, several servers: ours (each checkpoint) vs `transformers serve` vs llama.cpp's server.

Workload (issue 10's peer comparison): 24-word WikiText-2 prompts, 32 new tokens, greedy,
non-streamed OpenAI /v1/completions, closed-loop clients at each level (1, 8, 32). Per server and
level: generated tokens/s (usage.completion_tokens over wall time), tokens per request, latency
p50/p95 and the peak RSS of the server's process tree. Every server gets one warm-up round first.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import llamacpp
from bench.load import Sample, closed_loop, closed_loop_for, completion_once, model_id
from bench.peers import LlamaCppServer, TransformersServe, same_size_llama
from loadtests.rss import RssSampler
from loadtests.server_process import LoopbackProcess, ServerProcess

OUR_ENV = {"CHIAR_QUEUE_SIZE": "1024", "CHIAR_MAX_BATCH_SIZE": "32", "CHIAR_LOG_LEVEL": "warning"}


@dataclass
class Workload:
    """Prompts and sizes shared by every server."""

    prompts: list[str]
    max_tokens: int
    levels: list[int]
    requests_per_client: int
    min_requests: int
    min_seconds: float = 0.0  # a level shorter than this is measured again, longer (load.closed_loop_for)


@dataclass
class Comparison:
    """Rows per server and level, plus how each peer was run (or why it could not be)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@contextmanager
def started(server: LoopbackProcess, ready_timeout: float) -> Iterator[LoopbackProcess]:
    """Start the server (waiting up to ready_timeout s for readiness) and stop it afterwards."""
    server.start(ready_timeout)
    try:
        yield server
    finally:
        server.stop()


def measure(name: str, server: LoopbackProcess, work: Workload, levels: list[int], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Warm up, then one closed-loop level after another against a started server."""
    model = asyncio.run(model_id(server.url))

    async def one(client: httpx.AsyncClient, i: int) -> Sample:
        return await completion_once(client, model, work.prompts[i % len(work.prompts)], work.max_tokens, extra)

    asyncio.run(closed_loop(server.url, min(4, max(levels)), 1, one))  # warm-up, not measured
    rows = []
    for clients in levels:
        per_client = max(work.min_requests // clients, work.requests_per_client)
        rss = RssSampler(server.pid, interval=0.2, tree=True)
        rss.start()
        try:
            row = {"server": name, **asyncio.run(closed_loop_for(server.url, clients, per_client, one, work.min_seconds))}
        finally:
            rss.stop()
        row_peak = row["peak_rss_mib"] = rss.peak
        rows.append(row)
        print(f"{name:>28} c={clients:<3} {row['tokens_per_s']:8.1f} tok/s ({row['tokens_per_request']:.1f} tok/req) "
              f"p50 {row['lat_p50']:8.1f} ms  peak RSS {row_peak:7.0f} MiB", flush=True)
    return rows


def run(checkpoints: dict[str, Path], work: Workload, tmp: Path, *, transformers: bool = True,
        llama_cpp: bool = False, threads: int | None = None) -> Comparison:
    """Ours for every checkpoint, then the peers serving a Llama of the first checkpoint's shapes."""
    out = Comparison()
    env = {**OUR_ENV, **({"CHIAR_THREADS": str(threads)} if threads else {})}
    for name, path in checkpoints.items():
        # ignore_eos: our schema ignores unknown fields; when the server supports it, all 32 tokens are made
        with started(ServerProcess(path, env=env, log_path=tmp / f"compare-{name}.log"), 180) as server:
            out.rows += measure(f"ours: {name}", server, work, work.levels, {"ignore_eos": True})
    shapes = next(iter(checkpoints.values()))
    llama = same_size_llama(shapes, tmp / "llama")
    out.notes.append(f"Peer model: LlamaForCausalLM with `{shapes.name}`'s shapes, random weights (seed 0), fp32, "
                     "its tokenizer (BOS prepended), saved with save_pretrained; loaded offline from a local path.")
    if transformers:
        peer = TransformersServe(llama, tmp / "transformers-serve.log", threads)
        try:
            with started(peer, 600):
                # transformers serve rejects unknown fields (HTTP 422), so no ignore_eos: with random
                # weights EOS is 1 token in 8192, and tokens/request in the table shows what was made
                out.rows += measure("transformers serve (CB)", peer, work, work.levels, {})
            out.notes.append(f"transformers serve: `{peer.describe()}`.")
        except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
            out.notes.append(f"transformers serve failed: {str(exc)[:500]}")
    if llama_cpp:
        try:
            build = llamacpp.ensure_built()
            gguf = llamacpp.convert_to_gguf(build, llama, tmp / "llama-f32.gguf")
            context = json.loads((llama / "config.json").read_text())["max_position_embeddings"]
            described = ""
            for clients in work.levels:  # one slot per client: a server per level
                server = LlamaCppServer(build, gguf, clients, context, tmp / f"llama-server-{clients}.log", threads)
                with started(server, 300):
                    out.rows += measure("llama.cpp server", server, work, [clients], {"ignore_eos": True})
                described = server.describe().replace(f"-np {clients} -c {clients * context}", "-np N -c N*" + str(context))
            out.notes.append(f"llama.cpp: {build.describe()}; f32 GGUF by the vendored convert_hf_to_gguf.py; `{described}`.")
        except (RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:
            out.notes.append(f"llama.cpp failed: {str(exc)[:800]}")
    return out


def render(c: Comparison, work: Workload) -> list[str]:
    """The peer table, ratio lines and notes (markdown lines)."""
    lines = ["### Same workload, peer servers", "",
             f"Non-streamed `/v1/completions`, 24-word prompts, {work.max_tokens} new tokens, greedy; closed-loop clients. "
             "Peak RSS: the server's whole process tree during the level.", "",
             "| server | clients | requests | generated tokens/s | tokens/request | latency p50 ms | p95 ms | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in c.rows:
        lines.append(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['tokens_per_request']:.1f} "
                     f"| {r['lat_p50']:.1f} | {r['lat_p95']:.1f} | {r['peak_rss_mib']:.0f} |")
    by = {(r["server"], r["clients"]): r for r in c.rows}
    lines += ["", "Ratios (ours / peer; targets: >= 1x transformers serve with <= 0.1x its memory, >= 0.5x llama.cpp):", ""]
    for ours in dict.fromkeys(r["server"] for r in c.rows if r["server"].startswith("ours")):
        for peer in ("transformers serve (CB)", "llama.cpp server"):
            pairs = [(by[(ours, n)], by[(peer, n)]) for n in work.levels if (ours, n) in by and (peer, n) in by]
            if pairs:
                tps = ", ".join(f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x at {a['clients']}" for a, b in pairs)
                mem = ", ".join(f"{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x" for a, b in pairs)
                lines.append(f"- {ours} vs {peer}: tokens/s {tps}; memory {mem}")
    return [*lines, "", *(f"- {n}" for n in c.notes), ""]
