"""Soak: a mixed load on every route for 10 minutes (1 in the short run); the RSS slope after warm-up and errors."""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable

from loadtests.server_process import ROOT
from reliability.http import raw_request
from reliability.report import ProbeResult
from reliability.server_probes import AUTH, Env, start
from reliability.watchers import RssWatcher

CLIENTS = 4
WARM_UP = 0.2  # share of the run before the slope is measured
SLOPE_TARGET = 1.0  # MB per minute


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return float("nan")
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in samples) / var if var else float("nan")


def _requests(text: str, rng: random.Random, context: int, vocab: int) -> list[tuple[str, str, Callable[[], bytes]]]:
    """(name, path, body maker) of the mix: every route a client turns text into tokens or tokens into text on,
    each sized to fit the model (a prompt of at most `context` characters is well within `context` tokens)."""
    def words(lo: int, hi: int) -> str:
        start = rng.randrange(len(text) - 20_000)
        return text[start:start + rng.randrange(lo, max(lo + 1, hi))]

    def seed() -> int:
        return rng.randrange(10**6)

    short, new = min(400, context // 2), max(2, min(48, context // 4))
    return [
        (
            "generate",
            "/v1/generate",
            lambda: json.dumps(
                {"prompt": words(20, short), "max_new_tokens": rng.randrange(1, new), "temperature": 0.8, "seed": seed()}
            ).encode(),
        ),
        (
            "generate stream",
            "/v1/generate",
            lambda: json.dumps(
                {"prompt": words(20, short), "max_new_tokens": rng.randrange(1, new), "stream": True, "return_logprobs": True}
            ).encode(),
        ),
        (
            "completions",
            "/v1/completions",
            lambda: json.dumps(
                {"prompt": [words(20, short), words(20, short)], "max_tokens": new, "logprobs": 2, "echo": True, "seed": seed()}
            ).encode(),
        ),
        (
            "chat",
            "/v1/chat/completions",
            lambda: json.dumps(
                {"messages": [{"role": "user", "content": words(20, short)}], "max_tokens": new, "stream": rng.random() < 0.5}
            ).encode(),
        ),
        (
            "perplexity",
            "/v1/perplexity",
            lambda: json.dumps({"text": words(500, 6000), "return_logprobs": True, "return_routing": rng.random() < 0.3}).encode(),
        ),
        ("tokenize", "/v1/tokenize", lambda: json.dumps({"text": words(100, 20_000)}).encode()),
        ("vllm tokenize", "/tokenize", lambda: json.dumps({"prompt": words(100, 20_000), "return_token_strs": True}).encode()),
        (
            "detokenize",
            "/detokenize",
            lambda: json.dumps({"tokens": [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 500))]}).encode(),
        ),
    ]


def _client(
    url: str, until: float, seed: int, mix: Callable[[random.Random], list], statuses: Counter, lock: threading.Lock, errors: list[str]
) -> None:
    """Requests back to back until `until`; `statuses` counts "<name> <status>" and "failed"."""
    rng = random.Random(seed)
    mix = mix(rng)
    while time.monotonic() < until:
        name, path, body = rng.choice(mix)
        reply = raw_request(url, "POST", path, body(), AUTH, timeout=180)
        ok = reply.status == 200 and b'"error"' not in reply.body[-2000:]  # a stream's error arrives as an event
        with lock:
            statuses[f"{name} {reply.status}"] += 1
            statuses["failed"] += 0 if ok else 1
            if not ok and len(errors) < 50:
                errors.append(f"{name} -> {reply.status}: {reply.body[-200:].decode('utf-8', 'replace')}")


def probe_soak(env: Env) -> ProbeResult:
    minutes = 1.0 if env.short else 10.0
    text = (ROOT / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    vocab = json.loads((env.checkpoint / "config.json").read_text())["vocab_size"]

    def mix(rng: random.Random) -> list:
        return _requests(text, rng, env.context, vocab)

    server = start(env, "server-soak")
    statuses: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    try:
        rss = RssWatcher(server.pid, interval=1.0)
        rss.start()
        began = time.monotonic()
        until = began + 60 * minutes
        clients = [threading.Thread(target=_client, args=(server.url, until, 23 + i, mix, statuses, lock, errors)) for i in range(CLIENTS)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        rss.stop()
    finally:
        server.stop()
    samples = [(t - began, v) for t, v in rss.samples]
    settled = [(t, v) for t, v in samples if t >= WARM_UP * 60 * minutes]
    slope = slope_mb_per_min(settled)
    failed = statuses.pop("failed", 0)
    total = sum(statuses.values())
    met = slope <= SLOPE_TARGET
    return ProbeResult(
        "soak",
        f"{CLIENTS} closed-loop clients for {minutes:g} min, a random mix of generate (plain and streamed with logprobs), "
        "completions (echo + logprobs), chat, perplexity (logprobs, routing), tokenize, /tokenize and /detokenize; "
        f"RSS every second, slope by least squares after the first {WARM_UP:.0%}",
        total,
        f"{total - failed} of {total} answered 200; RSS slope after warm-up {slope:+.2f} MB/min",
        f"{failed} errors" + ("" if met else f"; target slope <= {SLOPE_TARGET:g} MB/min MISSED"),
        passed=failed == 0 and met,
        figures={
            "minutes": minutes,
            "requests": total,
            "requests per endpoint and status": dict(sorted(statuses.items())),
            "RSS at start (MB)": round(samples[0][1], 1) if samples else "n/a",
            "RSS after warm-up (MB)": round(settled[0][1], 1) if settled else "n/a",
            "RSS at end (MB)": round(samples[-1][1], 1) if samples else "n/a",
            "RSS max (MB)": round(max(v for _, v in samples), 1) if samples else "n/a",
            "RSS median per minute (MB)": [
                round(statistics.median(v for t, v in samples if m * 60 <= t < (m + 1) * 60), 1)
                for m in range(int(minutes))
                if any(m * 60 <= t < (m + 1) * 60 for t, _ in samples)
            ],
            "RSS slope after warm-up (MB/min)": round(slope, 3),
            "load average (1 min) at the end": round(os.getloadavg()[0], 2),
            f"target slope <= {SLOPE_TARGET:g} MB/min": "met" if met else "MISSED",
        },
        failures=errors,
    )
