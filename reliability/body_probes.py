"""Big bodies against a real server: refused fast, RSS bounded and given back, /health and a running stream unaffected."""

from __future__ import annotations

import gc
import json
import os
import select
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

from loadtests.server_process import ROOT
from reliability.http import raw_request
from reliability.report import ProbeResult
from reliability.server_probes import API_KEY, AUTH, Env, healthy, start
from reliability.watchers import Watch, rss_mb

MB = 2**20
BIG, SMALL = 30 * 10**6, MB  # the sizes: 30 MB raw text, 1 MiB JSON
WIKI = ROOT / "data" / "wikitext-2"
ROUNDS = 5  # of 64 concurrent 1 MiB bodies in the full run (1 in the short one)
TARGETS = {"refusal (s)": 1.0, "RSS peak over baseline (MB)": 300.0, "RSS after vs baseline": 0.10,
           "/health p99 (ms)": 100.0, "stream longest gap (ms)": 250.0}


def send_big(url: str, path: str, body: bytes, chunked: bool, timeout: float = 60.0) -> tuple[int | None, float]:
    """POST `body` in 64 KiB slices, stopping as soon as the server answers; (status, seconds to the status line)."""
    parts = urlsplit(url)
    head = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: text/plain\r\nAuthorization: Bearer {API_KEY}\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {len(body)}\r\n\r\n"
    start = time.monotonic()
    reply = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(head.encode())
        sent = 0
        while sent <= len(body) and time.monotonic() - start < timeout:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                break
            if not writable:
                continue
            piece = body[sent:sent + 65536]
            frame = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked and piece else (b"0\r\n\r\n" if chunked else piece)
            try:
                sock.sendall(frame)
            except OSError:  # the server answered and closed while we were still sending
                break
            sent += 65536 if piece else 1
        while b"\r\n" not in reply and time.monotonic() - start < timeout:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            reply += chunk
    seconds = time.monotonic() - start
    try:
        return int(reply.split(b" ", 2)[1]), seconds
    except (IndexError, ValueError):
        return None, seconds


def json_bodies(text: str) -> list[tuple[str, bytes]]:
    """One 1 MiB body per JSON route that turns text (or ids) into tokens, each over that route's limit."""
    ids = ", ".join(["1234"] * ((SMALL - 40) // 6))

    def fill(path: str, make: Callable[[str], dict]) -> tuple[str, bytes]:
        size = SMALL
        while len(body := json.dumps(make(text[:size])).encode()) > SMALL:  # escapes make JSON longer than the text
            size -= len(body) - SMALL
        return path, body

    return [
        fill("/v1/generate", lambda t: {"prompt": t, "max_new_tokens": 16}),
        fill("/v1/completions", lambda t: {"prompt": t, "max_tokens": 16}),
        ("/v1/completions", f'{{"prompt": [{ids}], "max_tokens": 1}}'.encode()),
        fill("/v1/chat/completions", lambda t: {"messages": [{"role": "user", "content": t}]}),
        fill("/v1/perplexity", lambda t: {"text": t}),
        fill("/v1/tokenize", lambda t: {"text": t}),
        fill("/tokenize", lambda t: {"prompt": t}),
    ]


def _concurrently(jobs: list[Callable[[], tuple[int | None, float]]]) -> list[tuple[int | None, float]]:
    results: list[tuple[int | None, float]] = [(None, 0.0)] * len(jobs)

    def run(i: int) -> None:
        results[i] = jobs[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _timed_json(url: str, path: str, body: bytes) -> tuple[int | None, float]:
    start = time.monotonic()
    reply = raw_request(url, "POST", path, body, AUTH, timeout=120)
    return reply.status, time.monotonic() - start


def _settled_rss(pid: int, seconds: float) -> float:
    """Median RSS over the last second of `seconds` (the server idle)."""
    time.sleep(max(0.0, seconds - 1.0))
    samples = []
    for _ in range(10):
        samples.append(rss_mb(pid))
        time.sleep(0.1)
    return statistics.median(samples)


def _warm_up(url: str, text: str) -> None:
    """Every route once at a normal size, so the baseline holds what serving allocates anyway."""
    for path, body in [("/v1/generate", {"prompt": text[:200], "max_new_tokens": 8}), ("/v1/perplexity", {"text": text[:2000]}),
                       ("/v1/completions", {"prompt": text[:200], "max_tokens": 4}), ("/v1/tokenize", {"text": text[:2000]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": text[:200]}], "max_tokens": 4}),
                       ("/tokenize", {"prompt": text[:2000]})]:
        raw_request(url, "POST", path, json.dumps(body).encode(), AUTH, timeout=120)
    raw_request(url, "POST", "/v1/perplexity/text", text[:20000].encode(), {**AUTH, "Content-Type": "text/plain"}, timeout=120)


def probe_big_bodies(env: Env) -> ProbeResult:
    text = (WIKI / "test.txt").read_text(encoding="utf-8")
    big = (text.encode() * (BIG // len(text.encode()) + 1))[:BIG]
    server = start(env, "server-bodies")
    try:
        _warm_up(server.url, text)
        baseline = _settled_rss(server.pid, 3.0)
        gc.disable()  # a full collection in this process (up to 100 ms) would count as refusal time
        with Watch(server.pid, server.url, AUTH, max(8, env.context - 16)) as watch:
            time.sleep(1.0)  # the stream is running
            t0 = time.monotonic()
            raw = _concurrently([lambda c=c: send_big(server.url, "/v1/perplexity/text", big, c) for c in (False, False, False)])
            chunked = _concurrently([lambda: send_big(server.url, "/v1/perplexity/text", big, True) for _ in range(3)])
            t1 = time.monotonic()
            bodies = json_bodies(text)
            small = []
            for _ in range(1 if env.short else ROUNDS):  # rounds, so /health's p99 is not just one sample's
                small += _concurrently([lambda i=i: _timed_json(server.url, *bodies[i % len(bodies)]) for i in range(64)])
            t2 = time.monotonic()
            time.sleep(1.0)
        gc.enable()
        after = _settled_rss(server.pid, 5.0)
        ok = healthy(server.url)
        phases = {"whole push": watch.figures(t0, t2), "30 MB phase": watch.figures(t0, t1), "1 MiB phase": watch.figures(t1, t2)}
        # RSS over the push and the second after it: a short phase may fall between two samples
        phases["whole push"]["peak RSS (MB)"] = round(max(watch.between("rss", t0, t2 + 1.0), default=float("nan")), 1)
        stream_errors = watch.stream_errors
    finally:
        gc.enable()
        server.stop()
    return _result(baseline, after, ok, raw + chunked, small, phases, stream_errors)


def _result(baseline: float, after: float, ok: bool, big: list, small: list, phases: dict[str, dict],
            stream_errors: list[str]) -> ProbeResult:
    statuses = Counter(str(s) for s, _ in big + small)
    wrong = sum(1 for s, _ in big if s != 413) + sum(1 for s, _ in small if s not in (400, 503))
    whole = phases["whole push"]
    peak = whole["peak RSS (MB)"]
    measured = {
        "refusal (s)": max(s for _, s in big + small),
        "RSS peak over baseline (MB)": peak - baseline,
        "RSS after vs baseline": abs(after - baseline) / baseline,
        "/health p99 (ms)": whole["/health p99 (ms)"],
        "stream longest gap (ms)": whole["stream longest gap (ms)"],
    }
    missed = [f"{k} {measured[k]:.3g} > {TARGETS[k]:g}" for k in TARGETS if not measured[k] <= TARGETS[k]]
    figures: dict = {
        "load average (1 min) at the end": round(os.getloadavg()[0], 2),
        "statuses": dict(sorted(statuses.items())),
        "RSS baseline (MB)": round(baseline, 1),
        "RSS peak (MB)": round(peak, 1),
        "RSS after (MB)": round(after, 1),
        "slowest refusal, 30 MB bodies (s)": round(max(s for _, s in big), 3),
        "slowest refusal, 1 MiB bodies (s)": round(max(s for _, s in small), 3),
        "median refusal, 1 MiB bodies (s)": round(statistics.median(s for _, s in small), 3),
    }
    figures |= {f"{k}, {phase}": v for phase, values in phases.items() for k, v in values.items()}
    figures |= {f"target {k} <= {TARGETS[k]:g}": "met" if measured[k] <= TARGETS[k] else f"MISSED ({measured[k]:.3g})" for k in TARGETS}
    return ProbeResult(
        "big-bodies",
        "3 concurrent 30 MB bodies to /v1/perplexity/text with Content-Length, 3 more chunked, then rounds of 64 "
        f"concurrent 1 MiB JSON bodies ({len(small) // 64} rounds) over the token limits of generate, completions (text and ids), "
        "chat, perplexity, tokenize and /tokenize; RSS, /health (two pollers, every 20 ms each) and a running stream watched "
        "throughout",
        len(big) + len(small),
        f"{len(big) + len(small) - wrong} refused with 413/400/503; RSS {baseline:.0f} -> peak {peak:.0f} -> {after:.0f} MB; "
        f"healthy after: {ok}",
        f"{wrong} answered otherwise; stream errors: {len(stream_errors)}"
        + (f"; targets missed: {', '.join(missed)}" if missed else "; every target met"),
        passed=wrong == 0 and ok and not stream_errors and not missed,
        figures=figures,
        failures=stream_errors,
    )
