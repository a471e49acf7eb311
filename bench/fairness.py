"""`make bench-fairness`: generation and scoring sharing the engine (the engine issue's fairness targets).

On one real server (loopback) it measures, side by side in one run:
1. a stream's inter-token latency (ITL) alone, then during a perplexity flood (N concurrent clients
   scoring long WikiText-2 documents back to back), and the flood's scored tokens/s alone and
   during the stream;
2. the latency of 1-token generations sent one after another during a burst of 24 concurrent
   200-token generations.

    python -m bench.fairness [--checkpoint checkpoints/chiar-small] [--flood 12] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path

import httpx

from loadtests.server_process import ROOT, ServerProcess


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def stream_itl(client: httpx.AsyncClient, new_tokens: int) -> list[float]:
    body = {"prompt": "The history of the city", "max_new_tokens": new_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}
    stamps: list[float] = []
    async with client.stream("POST", "/v1/generate", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if line.startswith('data: {"type":"token"'):
                stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)]


async def flood(client: httpx.AsyncClient, docs: list[str], clients: int, stop: asyncio.Event, seconds: float | None) -> float:
    """Closed-loop perplexity clients until `stop` (or `seconds`); returns scored tokens/s."""
    scored = 0
    start = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal scored
        k = i
        while not stop.is_set() and (seconds is None or time.perf_counter() - start < seconds):
            r = await client.post("/v1/perplexity", json={"text": docs[k % len(docs)]}, timeout=600)
            r.raise_for_status()
            scored += r.json()["usage"]["prompt_tokens"]
            k += clients

    await asyncio.gather(*(one(i) for i in range(clients)))
    return scored / (time.perf_counter() - start)


async def short_during_burst(client: httpx.AsyncClient, n_short: int) -> tuple[list[float], float]:
    body = {"prompt": "Once upon a time", "max_new_tokens": 200, "ignore_eos": True, "temperature": 1.0}
    burst = [asyncio.create_task(client.post("/v1/generate", json={**body, "seed": i}, timeout=600)) for i in range(24)]
    await asyncio.sleep(0.5)
    latencies = []
    while len(latencies) < n_short and not all(t.done() for t in burst):
        t0 = time.perf_counter()
        r = await client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 1}, timeout=600)
        r.raise_for_status()
        latencies.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    await asyncio.gather(*burst)
    return latencies, time.perf_counter() - t0


async def run(url: str, docs: list[str], flood_clients: int, new_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=64)) as client:
        await stream_itl(client, 8)  # warm
        itl_alone = await stream_itl(client, new_tokens)
        never = asyncio.Event()
        flood_alone = await flood(client, docs, flood_clients, never, seconds=15.0)
        stop = asyncio.Event()
        flood_task = asyncio.create_task(flood(client, docs, flood_clients, stop, None))
        await asyncio.sleep(2.0)
        itl_flood = await stream_itl(client, new_tokens)
        stop.set()
        flood_during = await flood_task
        shorts, _ = await short_during_burst(client, 20)
    return {"itl_alone": itl_alone, "itl_flood": itl_flood, "flood_alone": flood_alone, "flood_during": flood_during,
            "short": shorts}


def render(res: dict, args: argparse.Namespace) -> str:
    ms = 1000.0
    lines = [f"Checkpoint `{args.checkpoint.name}`, {args.flood} perplexity clients (WikiText-2 test documents of "
             f"~{args.doc_chars} characters), stream of {args.new_tokens} tokens (greedy).", "",
             "| measure | alone | during the flood |", "|---|---|---|",
             f"| stream ITL p50 (ms) | {ms * statistics.median(res['itl_alone']):.1f} | {ms * statistics.median(res['itl_flood']):.1f} |",
             f"| stream ITL p95 (ms) | {ms * pct(res['itl_alone'], 0.95):.1f} | {ms * pct(res['itl_flood'], 0.95):.1f} |",
             f"| flood scored tokens/s | {res['flood_alone']:.0f} | {res['flood_during']:.0f} "
             f"({100 * res['flood_during'] / res['flood_alone']:.0f}% of alone) |", "",
             f"1-token generations during a burst of 24 concurrent 200-token generations: {len(res['short'])} requests, "
             f"p50 {ms * statistics.median(res['short']):.0f} ms, p95 {ms * pct(res['short'], 0.95):.0f} ms."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "chiar-small")
    p.add_argument("--flood", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=120)
    p.add_argument("--doc-chars", type=int, default=20000)
    p.add_argument("--write", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    text = (ROOT / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    docs = [text[i: i + args.doc_chars] for i in range(0, min(len(text), 12 * args.doc_chars), args.doc_chars)]
    with ServerProcess(args.checkpoint) as server:
        res = asyncio.run(run(server.url, docs, args.flood, args.new_tokens))
    out = render(res, args)
    print(out)
    if args.json:
        args.json.write_text(json.dumps(res))
    if args.write:
        from bench.report import machine_line, write_section

        write_section(args.write, "bench-fairness", f"{machine_line()}\n\n{out}\n")


if __name__ == "__main__":
    main()
