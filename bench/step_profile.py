"""Where one engine decode step spends its time, at batch 1 and batch 32 (`make bench-step`).

Drives the real engine components in process (scheduler, runner, output processing, metrics, the
per-step outbox to an asyncio loop in another thread) on a checkpoint, with every sequence decoding,
and times each part of the step. Prints a markdown table; `--write FILE` puts it in BENCHMARKS.md's
`bench-step` section.

    python -m bench.step_profile [--checkpoint checkpoints/chiar-small] [--batches 1 32] [--steps 60]
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loadtests.server_process import ROOT


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed


def profile(checkpoint: Path, batch: int, steps: int) -> dict[str, float]:
    """Mean milliseconds per decode step for each part."""
    from model import load_checkpoint
    from server.engine import Engine, GenerateJob, GenParams
    from server.engine import output as output_module
    from server.metrics import Metrics
    from server.settings import Settings
    from server.textstream import TextStream

    model, tokenizer = load_checkpoint(checkpoint)
    model.eval()
    settings = Settings.from_sources(["--checkpoint", str(checkpoint), "--warmup", "false"], environ={})
    metrics = Metrics("cpu")
    engine = Engine(model, tokenizer, settings, metrics)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    queue: asyncio.Queue = asyncio.Queue()
    text = (ROOT / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:20000].split()
    jobs = []
    for i in range(batch):
        ids = [model.config.bos_token_id, *tokenizer.encode(" ".join(text[i * 24:(i + 1) * 24]), add_special_tokens=False).ids]
        params = GenParams(max_new_tokens=model.config.max_seq_len - len(ids) - 1, temperature=1.0, top_p=0.95, seed=i,
                           ignore_eos=True)
        jobs.append(GenerateJob(ids, params, queue=queue, loop=loop, index=i, timeout=3600))
    for job in jobs:
        job.outbox = engine.outbox
    engine.scheduler.add(jobs)
    torch.set_grad_enabled(False)
    while len(engine.scheduler.running) < batch:  # prefill everything first
        engine._step(engine.scheduler.schedule(time.perf_counter()))
        engine.outbox.flush()

    timers = Timers()
    engine.runner.model = type("Timed", (), {})()  # a thin proxy: time the model's own forward
    for name in ("decode_step", "prefill", "extend", "infer"):
        setattr(engine.runner.model, name, timers.wrap("model forward", getattr(model, name)))
    engine.runner.model.parameters = model.parameters
    output_module.sample_tokens = timers.wrap("sampling (batched)", output_module.sample_tokens)
    TextStream.push = timers.wrap("detokenisation + stop strings", TextStream.push)
    engine.output._accept = timers.wrap("output processing", engine.output._accept)
    sched = engine.scheduler
    sched.schedule = timers.wrap("scheduler", sched.schedule)
    sched.update_from_output = timers.wrap("scheduler", sched.update_from_output)
    metrics.record_forward = timers.wrap("metrics", metrics.record_forward)
    metrics.record_step = timers.wrap("metrics", metrics.record_step)
    engine.outbox.flush = timers.wrap("thread hand-off (outbox)", engine.outbox.flush)
    engine.runner.remove = timers.wrap("KV cache bookkeeping", engine.runner.remove)
    engine.runner.admit = timers.wrap("KV cache bookkeeping", engine.runner.admit)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine._step(sched.schedule(time.perf_counter()))
        engine.outbox.flush()
    total = time.perf_counter() - t0
    loop.call_soon_threadsafe(loop.stop)
    parts = dict(timers.seconds)
    parts["output processing"] -= parts.get("detokenisation + stop strings", 0.0)
    parts["engine loop, other"] = total - sum(parts.values())
    parts["step total"] = total
    return {k: 1000 * v / steps for k, v in parts.items()}


def table(results: dict[int, dict[str, float]]) -> str:
    batches = sorted(results)
    names = [k for k in results[batches[0]] if k != "step total"] + ["step total"]
    lines = ["| part of one decode step | " + " | ".join(f"batch {b}: ms (share)" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for name in names:
        cells = []
        for b in batches:
            ms, total = results[b].get(name, 0.0), results[b]["step total"]
            cells.append(f"{ms:.2f} ({100 * ms / total:.0f}%)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    per_token = " | ".join(f"{results[b]['step total'] / b:.2f}" for b in batches)
    lines.append(f"| per generated token | {per_token} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "chiar-small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    results = {b: profile(args.checkpoint, b, args.steps) for b in args.batches}
    text = table(results)
    print(text)
    if args.write:
        from bench.report import machine_line, write_section

        write_section(args.write, "bench-step", f"{machine_line()}\n\nCheckpoint `{args.checkpoint.name}`, "
                      f"{args.steps} steps, temperature 1 with top-p 0.95, every sequence decoding.\n\n{text}\n")


if __name__ == "__main__":
    main()
