"""Closed-loop HTTP clients for `bench.server`.

Each of N workers sends its requests back to back; a level's numbers are requests/s, tokens/s
(generated tokens for generation, scored tokens for perplexity), latency, TTFT and inter-token
latency (ITL: per request, the mean gap between streamed tokens after the first) percentiles.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bench.report import percentile


@dataclass
class Sample:
    """One request: seconds to the last byte, to the first token (NaN if not streamed), tokens, and the
    mean seconds between its streamed tokens after the first (NaN if not streamed or one token)."""

    latency: float
    ttft: float
    tokens: int
    itl: float = float("nan")


async def generate_once(client: httpx.AsyncClient, prompt: str, max_new_tokens: int, seed: int) -> Sample:
    """Streamed native /v1/generate, EOS ignored; TTFT at the first SSE token event."""
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0.8, "seed": seed, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    ttft = last = None
    tokens = first_tokens = 0
    async with client.stream("POST", "/v1/generate", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"generate: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("type") == "token":
                last = time.perf_counter() - start
                if ttft is None:
                    ttft, first_tokens = last, len(event["token_ids"])
                tokens += len(event["token_ids"])
            elif "error" in event:
                raise RuntimeError(f"generate: {event['error']}")
    after_first = tokens - first_tokens
    itl = (last - ttft) / after_first if ttft is not None and last is not None and after_first > 0 else float("nan")
    return Sample(time.perf_counter() - start, ttft if ttft is not None else float("nan"), tokens, itl)


async def perplexity_once(client: httpx.AsyncClient, text: str) -> Sample:
    """Native /v1/perplexity of one text; tokens = scored tokens."""
    start = time.perf_counter()
    r = await client.post("/v1/perplexity", json={"text": text})
    if r.status_code != 200:
        raise RuntimeError(f"perplexity: HTTP {r.status_code}: {r.text[:300]}")
    return Sample(time.perf_counter() - start, float("nan"), int(r.json()["results"][0]["tokens"]))


async def completion_once(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                          extra: dict[str, Any]) -> Sample:
    """Non-streamed OpenAI /v1/completions, greedy; tokens = usage.completion_tokens (what the server says it made)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
    start = time.perf_counter()
    r = await client.post("/v1/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"completions: HTTP {r.status_code}: {r.text[:300]}")
    return Sample(time.perf_counter() - start, float("nan"), int(r.json()["usage"]["completion_tokens"]))


async def model_id(url: str) -> str:
    """The first model id the server lists at /v1/models."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        r = await client.get("/v1/models")
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])


async def closed_loop(url: str, clients: int, per_client: int,
                      make: Callable[[httpx.AsyncClient, int], Awaitable[Sample]]) -> dict[str, Any]:
    """`clients` concurrent workers, each sending `per_client` requests back to back."""
    results: list[Sample] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(w: int) -> None:
            for i in range(per_client):
                results.append(await make(client, w * per_client + i))

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - start
    return summarise(results, wall, clients)


async def closed_loop_for(url: str, clients: int, per_client: int, make: Callable[[httpx.AsyncClient, int], Awaitable[Sample]],
                          min_seconds: float) -> dict[str, Any]:
    """`closed_loop`, long enough to measure: when `per_client` requests a client take under `min_seconds`,
    a second pass sized to last about that long is the one reported (the first warmed the server up).
    Sixteen perplexity requests at 8 clients took 0.13 s, and CHIAR/baseline ratios of such rows ranged
    0.37-1.48 over five runs."""
    row = await closed_loop(url, clients, per_client, make)
    if row["wall_s"] >= min_seconds:
        return row
    return await closed_loop(url, clients, math.ceil(per_client * min_seconds / max(row["wall_s"], 1e-3)), make)


def summarise(results: list[Sample], wall: float, clients: int) -> dict[str, Any]:
    """A level's row: requests, req/s, tokens/s, mean tokens per request, latency and TTFT p50/p95/p99 (ms)."""
    lat = [r.latency for r in results]
    ttft = [r.ttft for r in results if r.ttft == r.ttft]
    itl = [r.itl for r in results if r.itl == r.itl]
    tokens = sum(r.tokens for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "tokens_per_s": tokens / wall, "tokens_per_request": tokens / max(1, len(results)),
            **{f"lat_p{q}": percentile(lat, q / 100) * 1000 for q in (50, 95, 99)},
            **{f"ttft_p{q}": percentile(ttft, q / 100) * 1000 for q in (50, 95, 99)},
            **{f"itl_p{q}": percentile(itl, q / 100) * 1000 for q in (50, 95)}}
