"""Where one engine decode step spends its time, at batch 1 and batch 32 (`make bench-step`).

Drives the real engine (`Engine.step()`: scheduler, runner, output processing, metrics, the
per-step outbox to an asyncio loop in another thread) on a checkpoint, with every sequence
decoding, and times each part of the step. Also counts the aten ops one decode forward runs (torch
profiler). `--before REF` measures a git ref the same way in the same run (in a temporary worktree,
with the same interpreter), so the table shows before and after side by side.

    python -m bench.step_profile [--checkpoint checkpoints/chiar-small] [--batches 1 32] [--steps 60] [--before REF]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loadtests.server_process import ROOT

# Runs in this tree or in an old one (public model API only): aten ops of one decode forward.
OP_COUNT = """
import json, sys, torch
from torch.profiler import ProfilerActivity, profile
from model import load_checkpoint
model, _ = load_checkpoint(sys.argv[1])
torch.set_grad_enabled(False)
counts = {}
for batch in map(int, sys.argv[2:]):
    _, state = model.prefill(torch.randint(3, model.config.vocab_size, (batch, 24), generator=torch.Generator().manual_seed(0)))
    tokens = torch.full((batch,), 5)
    for _ in range(3):
        model.decode_step(tokens, state)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.decode_step(tokens, state)
    top = [e for e in prof.events() if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    counts[batch] = len(top)
print(json.dumps(counts))
"""


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
    import server.engine.output as output_module
    from model import load_checkpoint
    from server.engine.engine import Engine
    from server.engine.requests import GenerateJob, GenParams
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
        engine.step()
        engine.outbox.flush()

    timers = Timers()
    forward = model.forward_step
    model.forward_step = timers.wrap("model forward", forward)  # type: ignore[method-assign]
    output_module.sample_tokens = timers.wrap("sampling (batched)", output_module.sample_tokens)
    push = TextStream.push
    TextStream.push = timers.wrap("detokenisation + stop strings", push)  # type: ignore[method-assign]
    engine.output.process = timers.wrap("output processing", engine.output.process)  # type: ignore[method-assign]
    engine.runner.run = timers.wrap("runner (batch, KV fit, accounting)", engine.runner.run)  # type: ignore[method-assign]
    sched = engine.scheduler
    sched.schedule = timers.wrap("scheduler", sched.schedule)  # type: ignore[method-assign]
    sched.update_from_output = timers.wrap("scheduler", sched.update_from_output)  # type: ignore[method-assign]
    engine.metrics.record_forward = timers.wrap("metrics", engine.metrics.record_forward)  # type: ignore[method-assign]
    engine.metrics.record_step = timers.wrap("metrics", engine.metrics.record_step)  # type: ignore[method-assign]
    engine.outbox.flush = timers.wrap("thread hand-off (outbox)", engine.outbox.flush)  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
            engine.outbox.flush()
        total = time.perf_counter() - t0
    finally:
        model.forward_step = forward  # type: ignore[method-assign]
        TextStream.push = push  # type: ignore[method-assign]
    loop.call_soon_threadsafe(loop.stop)
    parts = dict(timers.seconds)
    # nested timers: report each part without what it contains
    parts["runner (batch, KV fit, accounting)"] -= parts.get("model forward", 0.0)
    parts["output processing"] -= parts.get("detokenisation + stop strings", 0.0) + parts.get("sampling (batched)", 0.0)
    parts["engine loop, other"] = total - sum(parts.values())
    parts["step total"] = total
    return {k: 1000 * v / steps for k, v in parts.items()}


def op_counts(tree: Path, checkpoint: Path, batches: list[int]) -> dict[int, int]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", OP_COUNT, str(checkpoint), *map(str, batches)], cwd=tree, env=env,
                         capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def measure_ref(ref: str, checkpoint: Path, batches: list[int], steps: int) -> tuple[str, dict[int, int]]:
    """The same measurements at git ref `ref` (its own bench.step_profile table), in a temporary worktree."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=ROOT, check=True, capture_output=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run([sys.executable, "-m", "bench.step_profile", "--checkpoint", str(checkpoint), "--steps", str(steps),
                                  "--batches", *map(str, batches)], cwd=tree, env=env, capture_output=True, text=True, check=True)
            return out.stdout.strip(), op_counts(tree, checkpoint, batches)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False, capture_output=True)


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
    parser.add_argument("--before", default=None, help="a git ref to measure the same way in the same run")
    parser.add_argument("--decode-threads", type=int, nargs="*", default=[1, 2],
                        help="thread counts of the model-level decode rows (ours, HF eager, llama-bench); none: skip them")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    checkpoint = args.checkpoint.resolve()
    before = measure_ref(args.before, checkpoint, args.batches, args.steps) if args.before else None
    results = {b: profile(checkpoint, b, args.steps) for b in args.batches}
    text = table(results)
    print(text)
    if args.write:
        from bench.report import git_commit, machine_line, write_section

        ops = op_counts(ROOT, checkpoint, args.batches)
        body = [f"{machine_line()}\n\nCheckpoint `{checkpoint.name}`, {args.steps} steps, temperature 1 with top-p 0.95, every sequence "
                f"decoding.\n\n### After (commit {git_commit()})\n\n{text}\n"]
        op_line = "aten ops in one decode forward (torch profiler, top level): " + ", ".join(f"batch {b}: {ops[b]}" for b in args.batches)
        if before is not None:
            before_table, before_ops = before
            body.append(f"\n### Before (commit {args.before}), same run\n\n{before_table}\n")
            op_line += " (before: " + ", ".join(f"batch {b}: {before_ops[b]}" for b in args.batches) + ")"
        body.append(f"\n{op_line}\n")
        if args.decode_threads:
            from bench import decode_row

            chiar, baseline = ROOT / "checkpoints" / "chiar-small", ROOT / "checkpoints" / "baseline-small"
            decode_table, notes = decode_row.rows(chiar, baseline, args.decode_threads)
            body.append(f"\n### The model's decode step beside llama-bench and HF (same run)\n\n{decode_row.render(decode_table, notes)}\n")
        write_section(args.write, "bench-step", "".join(body))


if __name__ == "__main__":
    main()
