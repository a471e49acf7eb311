"""`make bench-gpu` (`python -m bench.gpu`): GPU readiness in one command (issue 12 item 5).

1. The model precision tests (tests/model/test_precision.py): float32 and bfloat16 on the CPU and on
   CUDA against float32 on the CPU, with the tolerances that file states.
2. A server smoke test on CUDA: `python -m server --device cuda --dtype bfloat16`, one generation,
   one perplexity, and the forward-latency metric labelled device="cuda".
3. One routing layer vs one full-attention layer, timed around each block inside real hard-gated
   inference (CUDA events on CUDA, perf_counter on the CPU): 2048 and 8192 tokens on CUDA in bfloat16
   and float32, 2048 on the CPU. Model: bench.model's size (d=256, L=8, 8 heads, d_ff=1024), random
   weights, CHIAR thresholds at each routing layer's median entropy (training.calibrate.calibrate_evenly).

Without CUDA it says so in one line, runs the CPU parts (1 on the CPU cases, 3 at 2048 tokens) and
leaves BENCHMARKS.md alone; with CUDA and --write it writes the `bench-gpu` section, card named.

    python -m bench.gpu [--write BENCHMARKS.md] [--seqs 2048 8192] [--repeats 10] [--quick] [--skip-tests]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.report import machine_line, write_section
from loadtests.server_process import ROOT

SECTION = "bench-gpu"
NO_CUDA = ("no CUDA device: skipping the bf16 model tests on cuda, the cuda server smoke test and the CUDA-event "
           "benchmark; running the CPU parts")
PRECISION_TESTS = "tests/model/test_precision.py"


@dataclass
class LayerRow:
    device: str
    dtype: str
    seq: int
    routed_ms: float  # one routing layer (DCT + entropy + routing + attention on the routed tokens + DCT mix + FFN)
    full_ms: float  # one full-attention layer of the baseline (attention + FFN)
    share: float  # tokens routed to attention in the routing layers
    chiar_ms: float  # whole CHIAR forward (hard-gated inference)
    baseline_ms: float  # whole baseline forward


# ------------------------------------------------------------------------ 1. tests
def run_tests(cuda: bool) -> tuple[bool, str]:
    """The precision tests; on CUDA only the cuda cases (the CPU ones run in `make test`)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", PRECISION_TESTS, *(["-k", "cuda"] if cuda else [])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"precision tests ({'cuda cases' if cuda else 'CPU cases; no CUDA, so no cuda cases'}): {summary}", flush=True)
    if proc.returncode:
        print(proc.stdout[-4000:] + proc.stderr[-2000:], flush=True)
    return proc.returncode == 0, summary


# ------------------------------------------------------------------------ 2. server smoke
def server_smoke(checkpoint: Path | None, log_dir: Path, device: str = "cuda") -> tuple[bool, str]:
    """A real server on `device` in bfloat16: generate, perplexity, and forward latency recorded for that device."""
    import httpx

    from loadtests.metrics_snapshot import samples
    from loadtests.server_process import ServerProcess

    if checkpoint is None or not (checkpoint / "config.json").is_file():
        from bench.checkpoints import random_checkpoints

        checkpoint, _ = random_checkpoints(log_dir, max_seq_len=2048)
    server = ServerProcess(checkpoint, log_path=log_dir / "gpu-server.log", args=["--device", device, "--dtype", "bfloat16"])
    try:
        server.start(ready_timeout=300)
        gen = httpx.post(
            server.url + "/v1/generate", json={"prompt": "The tower is", "max_new_tokens": 16, "ignore_eos": True}, timeout=120
        )
        ppl = httpx.post(
            server.url + "/v1/perplexity",
            json={"text": "The tower is 324 metres tall , about the same height as an 81 @-@ storey building ."},
            timeout=120,
        )
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
    except Exception as exc:  # report, not crash: the other parts still run
        return False, f"server did not serve on {device}: {type(exc).__name__}: {exc}\n{server.output_tail()}"
    finally:
        server.stop()
    counts: dict[tuple[str | None, str | None], float] = {}
    for (name, labels), value in samples(metrics).items():  # summed over models
        if name == "chiar_forward_latency_seconds_count":
            key = (dict(labels).get("phase"), dict(labels).get("device"))
            counts[key] = counts.get(key, 0.0) + value
    problems = []
    if gen.status_code != 200 or gen.json().get("usage", {}).get("completion_tokens") != 16:
        problems.append(f"generate: HTTP {gen.status_code} {gen.text[:200]}")
    if ppl.status_code != 200 or not ppl.json()["results"][0]["perplexity"] > 0:
        problems.append(f"perplexity: HTTP {ppl.status_code} {ppl.text[:200]}")
    if not counts.get(("prefill", device)) or not counts.get(("decode", device)):
        problems.append(f"no forward latency recorded for device {device}: {counts}")
    detail = "; ".join(problems) or (
        f"generate 16 tokens and perplexity {ppl.json()['results'][0]['perplexity']:.1f} on {device} "
        f"(bfloat16), forward latency recorded for device={device}"
    )
    return not problems, detail


# ------------------------------------------------------------------------ 3. layer timings
def block_times(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> tuple[dict[int, float], float]:
    """Median ms of each block (timed around Block.forward_step inside model.infer) and of the whole forward.
    Blocks have no boundaries inside the native whole-forward call, so it runs layer by layer here."""
    cuda = ids.device.type == "cuda"
    kernels = model.kernels
    whole_step = getattr(kernels, "whole_step", None)
    if whole_step is not None:
        kernels.whole_step = False
    marks: list[tuple[int, Any, Any]] = []

    def clock() -> Any:
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def wrap(index: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            out = forward(*args, **kwargs)
            marks.append((index, start, clock()))
            return out

        return timed

    for index, block in enumerate(model.blocks):
        block.forward_step = wrap(index, block.forward_step)  # instance attribute: shadows the method
    per_block: dict[int, list[float]] = {i: [] for i in range(len(model.blocks))}
    whole: list[float] = []
    try:
        with torch.inference_mode():
            model.infer(ids)  # warm-up
            for _ in range(repeats):
                marks.clear()
                start = clock()
                model.infer(ids)
                end = clock()
                if cuda:
                    torch.cuda.synchronize()
                    whole.append(start.elapsed_time(end))
                    for i, s, e in marks:
                        per_block[i].append(s.elapsed_time(e))
                else:
                    whole.append((end - start) * 1e3)
                    for i, s, e in marks:
                        per_block[i].append((e - s) * 1e3)
    finally:
        for block in model.blocks:
            del block.forward_step
        if whole_step is not None:
            kernels.whole_step = whole_step
    return {i: statistics.median(v) for i, v in per_block.items()}, statistics.median(whole)


def layer_rows(device: str, dtypes: list[torch.dtype], seqs: list[int], repeats: int) -> list[LayerRow]:
    from bench.model import SIZE
    from model import ChiarConfig, ChiarLM
    from training.calibrate import calibrate_evenly

    size = {**SIZE, "max_seq_len": max(max(seqs), SIZE["max_seq_len"])}
    torch.manual_seed(0)
    chiar32 = ChiarLM(ChiarConfig(**size, arch="chiar", routing="threshold")).eval().to(device)
    torch.manual_seed(0)
    base32 = ChiarLM(ChiarConfig(**size, arch="baseline")).eval().to(device)
    rows = []
    for seq in seqs:
        ids = torch.randint(0, size["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(seq)).to(device)
        calibrate_evenly(chiar32, ids)  # ~50% attention in every routing layer, on this input
        for dtype in dtypes:
            chiar, base = chiar32.to(dtype), base32.to(dtype)
            with torch.inference_mode():
                share = chiar.infer(ids).routing.attention_share(chiar.config.routing_layers)
            c_blocks, c_ms = block_times(chiar, ids, repeats)
            b_blocks, b_ms = block_times(base, ids, repeats)
            routed = [c_blocks[i] for i in chiar.config.routing_layers]
            row = LayerRow(
                device,
                str(dtype).removeprefix("torch."),
                seq,
                statistics.mean(routed),
                statistics.mean(b_blocks.values()),
                share,
                c_ms,
                b_ms,
            )
            rows.append(row)
            print(
                f"{device} {row.dtype} seq={seq}: routed layer {row.routed_ms:.3f} ms, full layer {row.full_ms:.3f} ms "
                f"({row.routed_ms / row.full_ms:.2f}x), attention share {share:.2f}; whole model CHIAR {c_ms:.2f} ms, "
                f"baseline {b_ms:.2f} ms",
                flush=True,
            )
            chiar32, base32 = chiar.float(), base.float()
    return rows


# ------------------------------------------------------------------------ report
def render(card: str, tests: tuple[bool, str], smoke: tuple[bool, str], rows: list[LayerRow], repeats: int) -> str:
    lines = [
        f"## GPU readiness (`make bench-gpu`): {card}",
        "",
        f"Machine: {machine_line()}; GPU: **{card}**.",
        "",
        f"- bf16 / fp32 model tests on cuda against fp32 on the CPU (`{PRECISION_TESTS}`, tolerances stated there): "
        f"{'passed' if tests[0] else 'FAILED'} ({tests[1]})",
        f"- server smoke test (`python -m server --device cuda --dtype bfloat16`): {'passed' if smoke[0] else 'FAILED'}: {smoke[1]}",
        "",
        f"One routing layer vs one full-attention layer, CUDA events around each block inside hard-gated inference "
        f"(batch 1, d=256, 8 heads, d_ff=1024, L=8, random weights, thresholds at the median entropy); medians of {repeats} runs, ms. "
        "A routing layer is DCT + entropy + routing + attention on its routed tokens + DCT mix of the rest + FFN; "
        "a full layer is attention + FFN on every token.",
        "",
        "| dtype | tokens | routed layer | full layer | routed / full | attention share | "
        "CHIAR forward | baseline forward | CHIAR / baseline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.dtype} | {r.seq} | {r.routed_ms:.3f} | {r.full_ms:.3f} | {r.routed_ms / r.full_ms:.2f}x | {r.share:.2f} | "
            f"{r.chiar_ms:.2f} | {r.baseline_ms:.2f} | {r.chiar_ms / r.baseline_ms:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", type=Path, default=None, help="markdown file to update with the CUDA figures (BENCHMARKS.md)")
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="tokens per timed forward (default: 2048 8192 on CUDA, 2048 on CPU)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "chiar-small", help="served by the smoke test")
    p.add_argument("--quick", action="store_true", help="smoke run: 256 tokens, 2 repeats")
    p.add_argument("--skip-tests", action="store_true", help="skip the precision tests (e.g. when `make test` just ran them)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.quick:
        args.seqs, args.repeats = args.seqs or [256], 2
    if not cuda:
        print(NO_CUDA, flush=True)
    tests = (True, "skipped (--skip-tests)") if args.skip_tests else run_tests(cuda)
    if not cuda:
        layer_rows("cpu", [torch.float32], args.seqs or [2048], args.repeats)
        print("no CUDA device: BENCHMARKS.md left as it is (its bench-gpu section holds CUDA figures only)", flush=True)
        return 0 if tests[0] else 1
    card = torch.cuda.get_device_name()
    smoke = server_smoke(args.checkpoint, Path(tempfile.mkdtemp(prefix="bench-gpu-")))
    print(f"server smoke test on cuda: {'passed' if smoke[0] else 'FAILED'}: {smoke[1]}", flush=True)
    rows = layer_rows("cuda", [torch.float32, torch.bfloat16], args.seqs or [2048, 8192], args.repeats)
    body = render(card, tests, smoke, rows, args.repeats)
    print(body)
    if args.write:
        write_section(args.write, SECTION, body)
        print(f"wrote {args.write}", flush=True)
    return 0 if tests[0] and smoke[0] else 1


if __name__ == "__main__":
    sys.exit(main())
