"""`make bench-kv` (`python -m bench.kv_capacity`): concurrent long sequences under one KV-cache budget, CHIAR vs baseline.

For each checkpoint a real `python -m server` runs with the same `--kv-cache-mb` (and the automatic
batch cap, so only the KV budget limits admission). First one long generation alone: the peak of
`chiar_kv_cache_bytes{kind="used"}` is the measured routed cache of one sequence. Then many long
generations at once; /metrics is polled, and the peak of `chiar_requests_running` is how many
sequences the server held together under the budget. The budget fits `--fit` baseline sequences.
The servers run with a long step target (`--step-target-ms 2000`): with the default 50 ms, prefill of
long prompts is throttled to keep decoding smooth, sequences finish before the budget fills, and the
peak would measure prefill speed, not KV capacity.

    python -m bench.kv_capacity [--chiar DIR] [--baseline DIR] [--fit 4] [--requests 16] [--new-tokens 32]
                                [--quick] [--write BENCHMARKS.md]

Without checkpoints it builds random-weight ones (bench.checkpoints.random_checkpoints) at context 2048.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.longtext import context_of, long_texts
from bench.report import machine_line, relative, write_section
from loadtests.metrics_snapshot import samples
from loadtests.server_process import ROOT, ServerProcess

SECTION = "bench-kv"
FLOAT32_BYTES = 4  # the server computes (and caches) in float32 unless --dtype says otherwise, bf16-stored weights included
TARGET = 1.8


@dataclass
class Capacity:
    """One model's figures under the shared budget."""

    model: str
    budget_bytes: int
    prompt_tokens: int
    new_tokens: int
    seq_kv_bytes: int  # measured: one sequence alone at its longest
    peak_running: int  # most sequences held at once during the burst
    peak_used_bytes: int
    requests: int
    ok: int
    wall_s: float

    @property
    def fits_by_bytes(self) -> int:
        """Sequences the budget holds at the measured bytes per sequence."""
        return self.budget_bytes // max(1, self.seq_kv_bytes)


class MetricsPoller:
    """Polls /metrics in a thread: peaks of running sequences and KV bytes used."""

    def __init__(self, url: str, interval: float = 0.02) -> None:
        self.url, self.interval = url, interval
        self.peak_running = 0
        self.peak_used = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                values = gauges(client.get("/metrics").text)
                self.peak_running = max(self.peak_running, int(values.get(("chiar_requests_running", ""), 0)))
                self.peak_used = max(self.peak_used, int(values.get(("chiar_kv_cache_bytes", "used"), 0)))
                self._stop.wait(self.interval)

    def __enter__(self) -> MetricsPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def gauges(text: str) -> dict[tuple[str, str], float]:
    """(name, kind label or '') -> value for the gauges this benchmark reads."""
    return {(name, dict(labels).get("kind", "")): value for (name, labels), value in samples(text).items()
            if name in ("chiar_requests_running", "chiar_kv_cache_bytes")}


def baseline_seq_bytes(checkpoint: Path, tokens: int) -> int:
    """K+V bytes of `tokens` tokens attending in every layer of a full-attention checkpoint, as served."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    return cfg["n_layers"] * 2 * cfg["d_model"] * FLOAT32_BYTES * tokens


async def generate(client: httpx.AsyncClient, prompt: str, new_tokens: int, seed: int) -> bool:
    body = {"prompt": prompt, "max_new_tokens": new_tokens, "temperature": 0.8, "seed": seed, "ignore_eos": True}
    r = await client.post("/v1/generate", json=body)
    if r.status_code != 200:
        print(f"  request {seed}: HTTP {r.status_code}: {r.text[:200]}", flush=True)
    return r.status_code == 200


def measure(name: str, checkpoint: Path, prompts: list[str], args: argparse.Namespace, budget: int, log_dir: Path) -> Capacity:
    env = {"CHIAR_KV_CACHE_MB": repr(budget / 2**20), "CHIAR_MAX_BATCH_SIZE": "0", "CHIAR_QUEUE_SIZE": "1024",
           "CHIAR_STEP_TARGET_MS": str(args.step_target_ms),
           "CHIAR_REQUEST_TIMEOUT": "3600", **({"CHIAR_THREADS": str(args.threads)} if args.threads else {})}
    server = ServerProcess(checkpoint, env=env, log_path=log_dir / f"kv-{name}.log").start(ready_timeout=300)
    try:
        async def alone() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=3600) as client:
                await generate(client, prompts[0], args.new_tokens, 0)

        with MetricsPoller(server.url) as solo:
            asyncio.run(alone())

        async def burst() -> list[bool]:
            limits = httpx.Limits(max_connections=args.requests + 4)
            async with httpx.AsyncClient(base_url=server.url, timeout=3600, limits=limits) as client:
                return await asyncio.gather(*(generate(client, prompts[i % len(prompts)], args.new_tokens, i + 1)
                                              for i in range(args.requests)))

        if not solo.peak_used:
            print(f"  {name}: the lone request finished between two polls: KV per sequence unknown (use more --new-tokens)", flush=True)
        start = time.perf_counter()
        with MetricsPoller(server.url) as poll:
            ok = asyncio.run(burst())
        wall = time.perf_counter() - start
    finally:
        server.stop()
    cap = Capacity(name, budget, args.prompt_tokens, args.new_tokens, solo.peak_used, poll.peak_running, poll.peak_used,
                   args.requests, sum(ok), wall)
    print(f"{name:>9}: {cap.seq_kv_bytes / 2**20:.2f} MiB KV per sequence, peak {cap.peak_running} sequences at once "
          f"({cap.peak_used_bytes / 2**20:.1f} of {budget / 2**20:.1f} MiB), {cap.ok}/{cap.requests} ok in {wall:.1f} s", flush=True)
    return cap


def render(caps: list[Capacity], names: dict[str, Path], args: argparse.Namespace) -> str:
    lines = [
        "## KV-cache capacity: concurrent long sequences under one budget (`make bench-kv`)",
        "",
        f"Machine: {machine_line()}.",
        "Checkpoints: " + ", ".join(f"{k} = `{v}`" for k, v in names.items()) + ".",
        f"Each server: `--kv-cache-mb {caps[0].budget_bytes / 2**20:.2f}` (fits {args.fit} baseline sequences at full "
        f"length), `--max-batch-size 0` (auto), `--step-target-ms {args.step_target_ms:g}` (prefill never the bottleneck); "
        f"{args.requests} streamed-off `/v1/generate` requests at once, "
        f"{args.prompt_tokens}-token prompts (WikiText-2 test) + {args.new_tokens} new tokens (EOS ignored). "
        'KV per sequence: the peak of `chiar_kv_cache_bytes{kind="used"}` while one request runs alone; '
        "peak concurrent: the peak of `chiar_requests_running` (admitted sequences, prefilling or decoding) "
        "polled every 20 ms during the burst.",
        "",
        "| model | KV per sequence (MiB) | budget / KV per sequence | peak concurrent sequences | peak KV used (MiB) | "
        "budget (MiB) | requests ok | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in caps:
        lines.append(
            f"| {c.model} | {c.seq_kv_bytes / 2**20:.2f} | {c.fits_by_bytes} | {c.peak_running} | "
            f"{c.peak_used_bytes / 2**20:.2f} | {c.budget_bytes / 2**20:.2f} | {c.ok}/{c.requests} | {c.wall_s:.1f} |"
        )
    by = {c.model: c for c in caps}
    if "CHIAR" in by and "baseline" in by:
        chiar, base = by["CHIAR"], by["baseline"]
        ratio = chiar.peak_running / max(1, base.peak_running)
        lines += [
            "",
            f"- KV bytes per sequence, CHIAR / baseline: **{chiar.seq_kv_bytes / max(1, base.seq_kv_bytes):.3f}**",
            f"- concurrent sequences under the same budget, CHIAR / baseline: **{ratio:.2f}x** "
            f"(target >= {TARGET}x: {'met' if ratio >= TARGET else 'not met'})",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chiar", type=Path, default=ROOT / "checkpoints" / "chiar-small")
    p.add_argument("--baseline", type=Path, default=ROOT / "checkpoints" / "baseline-small")
    p.add_argument("--random", action="store_true", help="random-weight checkpoints at --context even if trained ones exist")
    p.add_argument("--context", type=int, default=2048, help="context of the random-weight checkpoints")
    p.add_argument("--fit", type=float, default=4, help="the budget holds this many baseline sequences at full length")
    p.add_argument("--requests", type=int, default=16, help="generations sent at once (more than CHIAR can hold)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default: the context minus the new tokens minus BOS")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--step-target-ms",
        type=float,
        default=2000.0,
        help="server step target: high, so prefill keeps up with admission and only the KV budget limits it",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per server (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="smoke run: context 512 random checkpoints, 3 baseline sequences, 8 requests")
    p.add_argument("--write", type=Path, default=None, help="markdown file to update (BENCHMARKS.md)")
    p.add_argument("--json", type=Path, default=None, help="also dump the rows as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.random, args.context, args.fit, args.requests, args.new_tokens = True, 512, 3, 8, 8

    tmp = Path(tempfile.mkdtemp(prefix="bench-kv-"))
    if args.random or not (args.chiar / "config.json").is_file() or not (args.baseline / "config.json").is_file():
        from bench.checkpoints import random_checkpoints

        print(f"building random-weight checkpoints at context {args.context} ...", flush=True)
        args.chiar, args.baseline = random_checkpoints(tmp, max_seq_len=args.context)
    context = min(context_of(args.chiar), context_of(args.baseline))
    if args.prompt_tokens is None:
        args.prompt_tokens = context - args.new_tokens - 1
    if args.prompt_tokens + 1 + args.new_tokens > context:
        p.error(f"--prompt-tokens {args.prompt_tokens} + BOS + --new-tokens {args.new_tokens} exceed the context ({context})")
    seq_tokens = args.prompt_tokens + 1 + args.new_tokens
    budget = int(args.fit * baseline_seq_bytes(args.baseline, seq_tokens))
    prompts = long_texts(args.chiar, args.prompt_tokens, min(args.requests, 16))
    names = {"CHIAR": args.chiar, "baseline": args.baseline}
    caps = [measure(name, path, prompts, args, budget, tmp) for name, path in names.items()]
    rel = relative(names)
    body = render(caps, rel, args)
    print(body)
    if args.json:
        args.json.write_text(json.dumps([asdict(c) | {"fits_by_bytes": c.fits_by_bytes} for c in caps], indent=2))
    if args.write:
        write_section(args.write, SECTION, body)
        print(f"wrote {args.write}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
