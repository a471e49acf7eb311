"""Probes against real `python -m server` processes (loadtests.server_process.ServerProcess)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from loadtests.server_process import ServerProcess
from reliability.corpus import MARKER, malformed_cases, underflow_cases
from reliability.http import metric_value, post_json, raw_request
from reliability.report import ProbeResult

API_KEY = "probe-api-key-0c5e91"  # must never appear in the server log
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Env:
    checkpoint: Path
    work: Path
    short: bool
    context: int


def start(env: Env, name: str, **settings: str) -> ServerProcess:
    variables = {"CHIAR_THREADS": "1", "CHIAR_API_KEY": API_KEY, "CHIAR_LOG_LEVEL": "info", **settings}
    return ServerProcess(env.checkpoint, env=variables, log_path=env.work / f"{name}.log").start()


def healthy(url: str) -> bool:
    reply = post_json(url, "/v1/generate", {"prompt": "the", "max_new_tokens": 2, "temperature": 0}, AUTH, timeout=60)
    return raw_request(url, "GET", "/health", timeout=10).status == 200 and reply.status == 200


def wait_running_zero(url: str, timeout: float = 15.0) -> float | None:
    """Seconds until chiar_requests_running reads 0 (None: it did not)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if metric_value(url, "chiar_requests_running") == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def _run_cases(url: str, cases: list, statuses: Counter, failures: list[str], timeout: float = 150.0) -> int:
    """Send each case; a 5xx, or no reply where one is due, is lost. The default 150 s is past the
    server's own 120 s request timeout, so its limit shows up before ours."""
    lost = 0
    for case_id, method, path, body, declared in cases:
        truncated = declared is not None
        reply = raw_request(url, method, path, body, AUTH, declared_length=declared, timeout=10 if truncated else timeout,
                            half_close=truncated)
        statuses["closed (truncated by design)" if truncated and reply.status is None
                 else "no reply" if reply.status is None else str(reply.status)] += 1
        if (reply.status is None and not truncated) or (reply.status is not None and reply.status >= 500):
            lost += 1
            failures.append(f"{case_id} -> {reply.status}: {reply.body[:160].decode('utf-8', 'replace')}")
    return lost


def probe_malformed(env: Env, server: ServerProcess) -> ProbeResult:
    """Malformed inputs on every endpoint, then the underflowing sampling values, counting 5xx."""
    cases = malformed_cases(env.context, env.short)
    statuses: Counter = Counter()
    failures: list[str] = []
    lost = _run_cases(server.url, cases, statuses, failures)
    ok_after_malformed = healthy(server.url)
    under = underflow_cases(env.short)
    under_statuses: Counter = Counter()
    under_failures: list[str] = []
    under_lost = _run_cases(server.url, under, under_statuses, under_failures, timeout=15.0)
    ok_after = healthy(server.url)
    total = len(cases) + len(under)
    return ProbeResult(
        "malformed-input", "truncated/nested/huge bodies, invalid UTF-8, lone surrogates, NUL bytes, out-of-vocabulary ids, "
        "absurd counts, wrong methods on every endpoint over raw HTTP; then underflowing temperature/top_p "
        "(1e-45, 5e-324, 1e-300)", total,
        f"{total - lost - under_lost} answered below 500; server healthy after: {ok_after_malformed and ok_after}",
        f"{lost} 5xx or unanswered on the malformed corpus, {under_lost} of {len(under)} 5xx or unanswered (15 s) on "
        "underflowing sampling values",
        passed=lost == 0 and under_lost == 0 and ok_after, known_open=lost == 0 and under_lost > 0,
        figures={"malformed cases": len(cases), "malformed statuses": dict(sorted(statuses.items())),
                 "underflow cases": len(under), "underflow statuses": dict(sorted(under_statuses.items())),
                 "healthy after malformed": ok_after_malformed, "healthy after underflow": ok_after,
                 "malformed lost": lost, "underflow lost": under_lost},
        failures=failures + under_failures)


def _stream_and_drop(url: str, rng: random.Random) -> str:
    """Open a streamed generation, read a random number of bytes, drop the connection."""
    parts = urlsplit(url)
    body = json.dumps({"prompt": f"{MARKER} once upon a time", "max_new_tokens": 48, "stream": True,
                       "temperature": 0.8, "seed": rng.randrange(10**6)}).encode()
    head = (f"POST /v1/generate HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    cut = rng.choice(["before-reply", "headers", "mid-stream"])
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + body)
        if cut != "before-reply":
            want = 1 if cut == "headers" else rng.randrange(200, 3000)
            got = 0
            while got < want:
                chunk = sock.recv(min(4096, want - got))
                if not chunk:
                    break
                got += len(chunk)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, not FIN
    return cut


def probe_disconnects(env: Env, server: ServerProcess) -> ProbeResult:
    n = 10 if env.short else 100
    rng = random.Random(14)
    cuts: Counter = Counter()
    errors: list[str] = []
    threads = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            cut = _stream_and_drop(server.url, random.Random(rng.random() + i))
            with lock:
                cuts[cut] += 1
        except OSError as exc:
            with lock:
                errors.append(f"client {i}: {exc}")

    for i in range(n):  # a few at a time, so disconnects hit running, queued and fresh requests
        t = threading.Thread(target=one, args=(i,))
        t.start()
        threads.append(t)
        if len(threads) % 5 == 0:
            for t in threads[-5:]:
                t.join()
    for t in threads:
        t.join()
    freed = wait_running_zero(server.url)
    ok = healthy(server.url)
    return ProbeResult(
        "disconnects", "streamed /v1/generate requests dropped (TCP reset) before the reply, after the headers "
        "or mid-stream at a random byte, 5 at a time; then /metrics chiar_requests_running must return to 0", n,
        f"running gauge back to 0: {freed is not None}; server healthy: {ok}",
        f"{0 if freed is not None else 'slots still held'}; client errors: {len(errors)}",
        passed=freed is not None and ok,
        figures={"cut points": dict(sorted(cuts.items())), "seconds until running == 0": round(freed, 2) if freed is not None else "never"},
        failures=errors)


def _generate(url: str, seed: int) -> str | None:
    reply = post_json(url, "/v1/generate", {"prompt": "The history of the", "max_new_tokens": 24, "temperature": 0.9,
                                            "top_p": 0.95, "seed": seed}, AUTH)
    return json.loads(reply.body)["text"] if reply.status == 200 else None


def _background_load(url: str, stop: threading.Event) -> None:
    rng = random.Random(3)
    while not stop.is_set():
        post_json(url, "/v1/generate", {"prompt": "word " * rng.randrange(1, 30), "max_new_tokens": rng.randrange(4, 24),
                                        "temperature": 1.0, "seed": rng.randrange(1000)}, AUTH)


def probe_determinism(env: Env, server: ServerProcess) -> tuple[ProbeResult, ServerProcess]:
    """Same seed -> same text alone, under load, and after a restart; returns the restarted server."""
    seeds = [1, 2, 3] if env.short else list(range(1, 11))
    alone = {s: _generate(server.url, s) for s in seeds}
    stop = threading.Event()
    load = [threading.Thread(target=_background_load, args=(server.url, stop)) for _ in range(4)]
    for t in load:
        t.start()
    time.sleep(0.5)
    loaded = {s: _generate(server.url, s) for s in seeds}
    stop.set()
    for t in load:
        t.join()
    server.stop()
    restarted_server = start(env, "server-restarted")
    after = {s: _generate(restarted_server.url, s) for s in seeds}
    diffs = [f"seed {s}: alone {alone[s]!r} / load {loaded[s]!r} / restart {after[s]!r}" for s in seeds
             if not (alone[s] is not None and alone[s] == loaded[s] == after[s])]
    return ProbeResult(
        "determinism", "the same seeded sampled generation (temperature 0.9, top_p 0.95) alone, under 4 concurrent "
        "clients, and after a server restart", len(seeds) * 3,
        f"{len(seeds) - len(diffs)} of {len(seeds)} seeds gave identical text in all three", f"{len(diffs)} seeds differed",
        passed=not diffs, failures=diffs), restarted_server


def probe_log_hygiene(env: Env, logs: list[Path]) -> ProbeResult:
    """After every server probe: no API key, prompt marker or traceback in the default logs."""
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
    found = {"API key": API_KEY in text, "prompt marker": MARKER in text, "traceback": "Traceback" in text}
    generated = "generated text" if '"text":' in text else None
    leaks = [k for k, v in found.items() if v] + ([generated] if generated else [])
    return ProbeResult(
        "log-hygiene", "grep of the default (info) logs of every probe server, after prompts carrying a secret marker "
        "and requests authenticated with an API key", len(logs),
        f"{len(text.splitlines())} log lines checked", ", ".join(leaks) if leaks else "nothing leaked",
        passed=not leaks, figures={k: "present" if v else "absent" for k, v in found.items()})


def _hammer(url: str, until: float, statuses: Counter, lock: threading.Lock, retry_after: list[int]) -> None:
    while time.monotonic() < until:
        reply = raw_request(url, "POST", "/v1/generate", json.dumps(
            {"prompt": "the quick brown fox", "max_new_tokens": 16, "temperature": 0.7, "seed": 1}).encode(), AUTH, timeout=120)
        with lock:
            statuses[str(reply.status)] += 1
        if reply.status == 503:
            time.sleep(0.05)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe_overload(env: Env) -> ProbeResult:
    batch, queue = 4, 4
    clients = 4 * (batch + queue)
    duration = 10.0 if env.short else 60.0
    server = start(env, "server-overload", CHIAR_MAX_BATCH_SIZE=str(batch), CHIAR_QUEUE_SIZE=str(queue))
    try:
        rss_before = _peak_rss_mb(server.pid)
        statuses: Counter = Counter()
        lock = threading.Lock()
        until = time.monotonic() + duration
        threads = [threading.Thread(target=_hammer, args=(server.url, until, statuses, lock, [])) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ended = time.monotonic()
        while not healthy(server.url) and time.monotonic() - ended < 60:
            time.sleep(0.1)
        recovery = time.monotonic() - ended
        freed = wait_running_zero(server.url)
        rss_peak = _peak_rss_mb(server.pid)
    finally:
        server.stop()
    total = sum(statuses.values())
    bad = sum(v for k, v in statuses.items() if k not in ("200", "503"))
    return ProbeResult(
        "overload", f"{clients} closed-loop clients (4x capacity: max batch {batch} + queue {queue}) for {duration:.0f} s, "
        "16-token generations; then time until a fresh request succeeds", total,
        f"{statuses.get('200', 0)} completed, {statuses.get('503', 0)} refused with 503",
        f"{bad} answered other than 200/503", passed=bad == 0 and freed is not None,
        figures={"statuses": dict(sorted(statuses.items())), "503 share": f"{statuses.get('503', 0) / max(total, 1):.3f}",
                 "peak RSS before load (MB)": round(rss_before, 1), "peak RSS after load (MB)": round(rss_peak, 1),
                 "recovery time (s)": round(recovery, 2), "running gauge back to 0": freed is not None})


def probe_signals(env: Env) -> ProbeResult:
    """SIGTERM under load must finish in-flight requests; SIGKILL then a restart must serve again."""
    server = start(env, "server-sigterm", CHIAR_DRAIN_TIMEOUT="30")
    results: list[int | None] = []
    lock = threading.Lock()

    def client() -> None:
        reply = post_json(server.url, "/v1/generate", {"prompt": "once upon", "max_new_tokens": 32, "temperature": 0}, AUTH)
        with lock:
            results.append(reply.status)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    try:
        code = server.proc.wait(60)
    except subprocess.TimeoutExpired:  # a hung drain is a finding, not a crash of the probe
        code = None
    drain_s = time.monotonic() - started
    server.stop()
    completed = sum(1 for s in results if s == 200)
    # SIGKILL under load, then restart
    victim = start(env, "server-sigkill")
    loaders = [threading.Thread(target=lambda: post_json(victim.url, "/v1/generate", {"prompt": "a", "max_new_tokens": 32}, AUTH))
               for _ in range(4)]
    for t in loaders:
        t.start()
    time.sleep(0.3)
    assert victim.proc is not None
    os.kill(victim.pid, signal.SIGKILL)
    victim.proc.wait(30)
    for t in loaders:
        t.join()
    victim.stop()
    t0 = time.monotonic()
    again = start(env, "server-restarted-after-kill")
    restart_s = time.monotonic() - t0
    ok = healthy(again.url)
    again.stop()
    drained = completed == len(results) and code == 0
    return ProbeResult(
        "signals", "SIGTERM while 6 generations are in flight (they should complete, exit 0); SIGKILL under load, "
        "then a restart on the same checkpoint", len(results) + 1,
        f"{completed} of {len(results)} in-flight requests completed after SIGTERM; exit code {code}; restart serves: {ok}",
        f"{len(results) - completed} in-flight requests cut by SIGTERM" + ("" if ok else "; restart failed"),
        passed=drained and ok, known_open=ok and not drained,
        figures={"statuses after SIGTERM": dict(Counter(str(s) for s in results)), "SIGTERM to exit (s)": round(drain_s, 2),
                 "restart to ready after SIGKILL (s)": round(restart_s, 2)})
