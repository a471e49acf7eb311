"""`make bench-prefix` (`python -m bench.prefix`): the routed prefix cache and preemption, on real servers.

1. chat: a system prompt of `--system-tokens` (1,500) tokens and 8 users asking different questions
   (`/v1/chat/completions`, streamed, greedy). TTFT = the first chunk with content. Cold: `--no-prefix-cache`
   (every request prefills the whole prompt); warm: the cache holds the system prompt (a first user put it
   there). One user at a time, then all 8 at once.
2. lm-eval (`local-completions`) multiple choice over a local task whose 4 choices share one long context:
   wall time of the run and the server's request time, with and without the cache; accuracy and every
   log-likelihood compared.
3. capacity: cached prefix tokens under one budget, CHIAR vs baseline (distinct prompts until the cache evicts).
4. mixed load at 4x the budget: generations and scoring requests at once under a small `--kv-cache-mb`:
   failed requests, preemptions, evictions, and the peak of `chiar_kv_cache_bytes{used}` (polled) vs the limit.
5. design: a row started from a cached `--system-tokens` prefix by sharing its blocks vs copying them, and what
   recording costs (in process, bench/prefix_inprocess.py).

    python -m bench.prefix [--chiar DIR] [--baseline DIR] [--quick] [--skip-lm-eval] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.longtext import long_texts
from bench.prefix_inprocess import Design, bookkeeping, designs, server_threads
from bench.report import machine_line, relative, write_section
from loadtests.metrics_snapshot import samples
from loadtests.server_process import ROOT, ServerProcess

SECTION = "bench-prefix"
QUESTIONS = ["What is the main subject?", "Who is mentioned first?", "Summarise it in one line.", "When did it happen?",
             "Where does it take place?", "Why does it matter?", "What happened next?", "Name one number in it."]
CHOICES = [" history", " music", " sport", " science"]


def metric(url: str, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, have), v in samples(httpx.get(url + "/metrics", timeout=30).text).items() if n == name and want <= set(have))


def server(checkpoint: Path, log: Path, *args: str) -> ServerProcess:
    env = {"CHIAR_REQUEST_TIMEOUT": "3600", "CHIAR_QUEUE_SIZE": "1024"}
    return ServerProcess(checkpoint, log, env=env, args=list(args)).start(ready_timeout=600)


# ---------------------------------------------------------------------------- 1. chat TTFT
async def first_content(client: httpx.AsyncClient, model: str, system: str, question: str) -> float:
    body = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 8, "temperature": 0, "stream": True}
    start = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if (
                line.startswith("data: {")
                and json.loads(line[6:])["choices"]
                and json.loads(line[6:])["choices"][0]["delta"].get("content")
            ):
                return time.perf_counter() - start
    return time.perf_counter() - start


def chat(checkpoint: Path, system: str, log_dir: Path) -> dict[bool, dict[str, list[float]]]:
    """TTFTs without (False) and with (True) the cache: a first request (it caches the system prompt where the
    cache is on), the 8 users one at a time (the two servers alternate, so machine load hits both alike), then
    the 8 at once on each server in turn."""
    procs = {cache: server(checkpoint, log_dir / f"chat-{cache}.log", *([] if cache else ["--no-prefix-cache"])) for cache in (False, True)}
    model = checkpoint.name

    async def run() -> dict[bool, dict[str, list[float]]]:
        out: dict[bool, dict[str, list[float]]] = {cache: {"first": [], "sequential": [], "concurrent": []} for cache in procs}
        clients = {cache: httpx.AsyncClient(base_url=proc.url, timeout=3600) for cache, proc in procs.items()}
        try:
            for cache, client in clients.items():
                out[cache]["first"].append(await first_content(client, model, system, "Hello."))
            for question in QUESTIONS:
                for cache, client in clients.items():
                    out[cache]["sequential"].append(await first_content(client, model, system, question))
            for cache, client in clients.items():
                together = await asyncio.gather(*(first_content(client, model, system, q + " Briefly.") for q in QUESTIONS))
                out[cache]["concurrent"] = list(together)
        finally:
            for client in clients.values():
                await client.aclose()
        return out

    try:
        return asyncio.run(run())
    finally:
        for proc in procs.values():
            proc.stop()


# ---------------------------------------------------------------------------- 2. lm-eval
def write_task(root: Path, contexts: list[str]) -> str:
    rng = random.Random(0)
    docs = [
        {"context": c + "\nQuestion: what is this passage about?\nAnswer:", "choices": CHOICES, "answer": rng.randrange(4)}
        for c in contexts
    ]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "chiar_prefix_mc.yaml").write_text(
        f"task: chiar_prefix_mc\ndataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    higher_is_better: true\n"
    )
    return "chiar_prefix_mc"


@dataclass
class EvalRun:
    wall_s: float
    request_s: float
    accuracy: float
    loglikelihoods: list[list[float]]
    hit_tokens: float


def lm_eval(checkpoint: Path, root: Path, log_dir: Path, cache: bool) -> EvalRun:
    proc = server(checkpoint, log_dir / f"lm-eval-{cache}.log", *([] if cache else ["--no-prefix-cache"]))
    out = root / f"out-{cache}"
    try:
        context = int(json.loads((checkpoint / "config.json").read_text())["max_seq_len"]) - 1
        cmd = [
            str(Path(sys.executable).parent / "lm_eval"),
            "run",
            "--model",
            "local-completions",
            "--tasks",
            "chiar_prefix_mc",
            "--include_path",
            str(root),
            "--output_path",
            str(out),
            "--log_samples",
            "--model_args",
            f"base_url={proc.url}/v1/completions,model={checkpoint.name},max_length={context},tokenizer_backend=huggingface,"
            f"tokenizer={checkpoint}",
        ]
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")}
        before = metric(proc.url, "chiar_request_duration_seconds_sum", endpoint="/v1/completions")
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"lm_eval failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        request_s = metric(proc.url, "chiar_request_duration_seconds_sum", endpoint="/v1/completions") - before
        hits = metric(proc.url, "chiar_prefix_cache_hit_tokens_total")
    finally:
        proc.stop()
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["chiar_prefix_mc"]
    lines = next(out.rglob("samples_chiar_prefix_mc_*.jsonl")).read_text().splitlines()
    lls = [[float(ll) for ll, _ in json.loads(line)["filtered_resps"]] for line in sorted(lines, key=lambda s: json.loads(s)["doc_id"])]
    return EvalRun(wall, request_s, results["acc,none"], lls, hits)


# ---------------------------------------------------------------------------- 3. capacity
def capacity(checkpoint: Path, prompts: list[str], budget_mb: float, log_dir: Path) -> tuple[float, float, float]:
    """(cached prefix tokens, their bytes, evictions) once distinct prompts have filled the cache."""
    proc = server(checkpoint, log_dir / f"capacity-{checkpoint.name}.log", "--kv-cache-mb", str(budget_mb))
    try:
        with httpx.Client(base_url=proc.url, timeout=3600) as client:
            for prompt in prompts:
                r = client.post("/v1/completions", json={"model": checkpoint.name, "prompt": prompt, "max_tokens": 1})
                assert r.status_code == 200, r.text
        return (
            metric(proc.url, "chiar_prefix_cache_tokens"),
            metric(proc.url, "chiar_prefix_cache_bytes"),
            metric(proc.url, "chiar_prefix_cache_evictions_total"),
        )
    finally:
        proc.stop()


# ---------------------------------------------------------------------------- 4. mixed load over the budget
@dataclass
class LoadRun:
    requests: int
    failed: int
    budget_failures: int
    preemptions: float
    evictions: float
    peak_used: float
    limit: float
    demand: float
    wall_s: float


def mixed_load(checkpoint: Path, texts: list[str], probe: str, tokens: int, new_tokens: int, budget_mb: float, log_dir: Path) -> LoadRun:
    """`texts` of `tokens` tokens each: two of three generate `new_tokens`, the third is scored, all at once
    (`probe` measures the attention share first)."""
    proc = server(checkpoint, log_dir / "mixed.log", "--kv-cache-mb", str(budget_mb), "--max-batch-size", "64")
    peak, stop = [0.0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], metric(proc.url, "chiar_kv_cache_bytes", kind="used"))
            stop.wait(0.02)

    bodies = []
    for i, text in enumerate(texts):
        if i % 3 == 2:
            bodies.append(("/v1/perplexity", {"text": text}))
        else:
            bodies.append(
                ("/v1/completions", {"prompt": text, "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0.8, "seed": i})
            )

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=proc.url, timeout=3600, limits=httpx.Limits(max_connections=len(bodies) + 4)) as client:
            return list(await asyncio.gather(*(client.post(path, json=body) for path, body in bodies)))

    try:
        share = kv_share(proc.url, checkpoint, probe)
        demand = sum((tokens + (new_tokens if i % 3 != 2 else 0)) * kv_bytes_per_token(checkpoint) * share for i in range(len(texts)))
        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        start = time.perf_counter()
        answers = asyncio.run(fire())
        wall = time.perf_counter() - start
        stop.set()
        watcher.join()
        failed = [r for r in answers if r.status_code != 200]
        return LoadRun(
            len(bodies),
            len(failed),
            sum("kv_cache" in r.text for r in failed),
            metric(proc.url, "chiar_preemptions_total"),
            metric(proc.url, "chiar_prefix_cache_evictions_total"),
            peak[0],
            metric(proc.url, "chiar_kv_cache_bytes", kind="limit"),
            demand,
            wall,
        )
    finally:
        proc.stop()


def kv_bytes_per_token(checkpoint: Path) -> float:
    cfg = json.loads((checkpoint / "config.json").read_text())
    layers = cfg["n_layers"] - (1 if cfg["arch"] == "chiar" else 0)  # CHIAR's first layer holds no cache
    return layers * 2 * cfg["d_model"] * 4


def kv_share(url: str, checkpoint: Path, text: str) -> float:
    """Cache entries per token as a share of full attention, from one text's routing (the routed layers' share
    of attention, the last layer's every token; CHIAR's first layer holds none)."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    if cfg["arch"] != "chiar":
        return 1.0
    routed = httpx.post(url + "/v1/perplexity", json={"text": text}, timeout=600).json()["results"][0]["routing"]["attention_share"]
    return (routed * (cfg["n_layers"] - 2) + 1) / (cfg["n_layers"] - 1)


# ---------------------------------------------------------------------------- report
def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def render_chat(args: argparse.Namespace, chat_rows: dict[bool, dict[str, list[float]]]) -> list[str]:
    cold, warm = chat_rows[False], chat_rows[True]
    ratio = p50(warm["sequential"]) / p50(cold["sequential"])
    return [
        f"**Chat**: a {args.system_tokens}-token system prompt (WikiText-2 test), 8 users with different questions, "
        "`/v1/chat/completions` streamed, greedy, 8 new tokens; TTFT = first chunk with content (client side).",
        "",
        "| TTFT (ms) | cold (no cache) | warm (system prompt cached) | warm / cold |",
        "|---|---:|---:|---:|",
        f"| first request (nothing cached yet) | {1000 * p50(cold['first']):.0f} | {1000 * p50(warm['first']):.0f} | - |",
        f"| 8 users one at a time, p50 | {1000 * p50(cold['sequential']):.0f} | {1000 * p50(warm['sequential']):.0f} | {ratio:.3f} |",
        f"| 8 users at once, p50 | {1000 * p50(cold['concurrent']):.0f} | {1000 * p50(warm['concurrent']):.0f} | "
        f"{p50(warm['concurrent']) / p50(cold['concurrent']):.3f} |",
        "",
        f"- warm TTFT p50 / cold, one at a time: **{ratio:.3f}** (target <= 0.2: {verdict(ratio <= 0.2)})",
        "",
    ]


def render_eval(args: argparse.Namespace, evals: dict[bool, EvalRun]) -> list[str]:
    off, on = evals[False], evals[True]
    same = off.loglikelihoods == on.loglikelihoods
    return [
        f"**lm-eval** (`local-completions`, `--log_samples`): `chiar_prefix_mc`, {len(on.loglikelihoods)} documents, each a "
        f"WikiText-2 context of {args.context_tokens} + 12 k tokens (document k) and 4 one-word choices; lm-eval sends one "
        "request at a time (echo logprobs).",
        "",
        "| | wall time (s) | server request time (s) | accuracy | prefix-cache hit tokens |",
        "|---|---:|---:|---:|---:|",
        f"| no cache | {off.wall_s:.1f} | {off.request_s:.1f} | {off.accuracy:.4f} | {off.hit_tokens:.0f} |",
        f"| cache | {on.wall_s:.1f} | {on.request_s:.1f} | {on.accuracy:.4f} | {on.hit_tokens:.0f} |",
        "",
        f"- wall time with / without the cache: **{on.wall_s / off.wall_s:.3f}** "
        f"(target <= 0.5: {verdict(on.wall_s / off.wall_s <= 0.5)}); "
        f"server request time: {on.request_s / off.request_s:.3f} (the wall time includes lm-eval's own start-up)",
        f"- accuracy identical: {'yes' if on.accuracy == off.accuracy else '**no**'}; every log-likelihood identical (bit for bit): "
        f"{'yes' if same else '**no**'}",
        "",
    ]


def render_memory(
    args: argparse.Namespace, cap: dict[str, tuple[float, float, float]], load: LoadRun, design: list[Design], books: dict[str, float]
) -> list[str]:
    (c_tok, c_bytes, c_ev), (b_tok, b_bytes, b_ev) = cap["CHIAR"], cap["baseline"]
    ratio = c_tok / max(b_tok, 1)
    lines = [
        f"**Capacity**: `--kv-cache-mb {args.capacity_mb:g}`, {args.capacity_prompts} distinct {args.prompt_tokens}-token prompts "
        "one after another (1 new token each), then the cache's own gauges.",
        "",
        "| model | cached prefix tokens | cached bytes (MiB) | bytes per cached token | evicted blocks |",
        "|---|---:|---:|---:|---:|",
        f"| CHIAR | {c_tok:.0f} | {c_bytes / 2**20:.2f} | {c_bytes / max(c_tok, 1):.0f} | {c_ev:.0f} |",
        f"| baseline | {b_tok:.0f} | {b_bytes / 2**20:.2f} | {b_bytes / max(b_tok, 1):.0f} | {b_ev:.0f} |",
        "",
        f"- cached prefix tokens, CHIAR / baseline under the same budget: **{ratio:.2f}x** (target >= 1.8: {verdict(ratio >= 1.8)})",
        "",
        f"**Mixed load over the budget** (CHIAR): `--kv-cache-mb {args.load_mb:g}`, {load.requests} requests at once "
        f"({args.prompt_tokens}-token texts; two in three generate {args.new_tokens} tokens, one in three is scored), demand at "
        f"the measured attention share {load.demand / 2**20:.1f} MiB = **{load.demand / load.limit:.1f}x** the budget; "
        '`chiar_kv_cache_bytes{kind="used"}` polled every 20 ms.',
        "",
        "| requests | failed | failed for the KV budget | preemptions | evicted blocks | peak used (MiB) | limit (MiB) | wall (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {load.requests} | {load.failed} | {load.budget_failures} | {load.preemptions:.0f} | {load.evictions:.0f} | "
        f"{load.peak_used / 2**20:.2f} | {load.limit / 2**20:.2f} | {load.wall_s:.1f} |",
        "",
        f"- 0 failures from the budget, used never over the limit: {verdict(load.budget_failures == 0 and load.peak_used <= load.limit)}",
        "",
        f"**Sharing vs copying a cached prefix** (in process, CHIAR, a {args.system_tokens}-token prefix, 8 rows started from it, "
        f"{args.threads} forward thread(s) as the server's default):",
        "",
        "| design | attach (ms, p50) | new KV per row (KiB) | first forward after it (ms, p50) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {d.mode} | {d.attach_ms:.2f} | {d.kib_per_row:.0f} | {d.step_ms:.1f} |" for d in design]
    return [
        *lines,
        "",
        f"**Bookkeeping** (in process, CHIAR): recording the cached blocks of a {args.system_tokens}-token prefill takes "
        f"{books['prefill record']:.1f} ms beside its {books['prefill forward']:.0f} ms forward "
        f"({books['prefill record with logprobs']:.1f} ms with the log-probabilities and top 5 scoring keeps); a decode step of "
        f"16 sequences: {books['decode record']:.2f} ms beside its {books['decode forward']:.1f} ms forward.",
    ]


def render(
    args: argparse.Namespace,
    names: dict[str, Path],
    chat_rows: dict[bool, dict[str, list[float]]],
    evals: dict[bool, EvalRun] | None,
    cap: dict[str, tuple[float, float, float]],
    load: LoadRun,
    design: list[Design],
    books: dict[str, float],
) -> str:
    lines = [
        "## Prefix cache and preemption (`make bench-prefix`)",
        "",
        f"Machine: {machine_line()}.",
        "Checkpoints: " + ", ".join(f"{k} = `{v}`" for k, v in names.items()) + ". Servers on loopback, default settings "
        "unless stated; cold = `--no-prefix-cache`.",
        "",
    ]
    lines += render_chat(args, chat_rows)
    lines += render_eval(args, evals) if evals is not None else []
    lines += render_memory(args, cap, load, design, books)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chiar", type=Path, default=ROOT / "checkpoints" / "chiar-small")
    p.add_argument("--baseline", type=Path, default=ROOT / "checkpoints" / "baseline-small")
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--docs", type=int, default=60, help="lm-eval documents (4 choices each)")
    p.add_argument("--context-tokens", type=int, default=1200, help="the shortest lm-eval context (document k: 12 k more)")
    p.add_argument("--prompt-tokens", type=int, default=400, help="prompts of the capacity and mixed-load runs")
    p.add_argument("--capacity-mb", type=float, default=32.0)
    p.add_argument("--capacity-prompts", type=int, default=40)
    p.add_argument("--load-mb", type=float, default=24.0)
    p.add_argument("--load-requests", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--skip-lm-eval", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run with small sizes (a tiny checkpoint's context fits)")
    p.add_argument("--write", type=Path, default=None, help="markdown file to update (BENCHMARKS.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.system_tokens, args.docs, args.context_tokens, args.prompt_tokens = 48, 2, 40, 40
        args.capacity_mb, args.capacity_prompts, args.load_mb, args.load_requests, args.new_tokens = 0.1, 12, 0.1, 9, 16
    tmp = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    system = long_texts(args.chiar, args.system_tokens, 1)[0]
    print("chat ...", flush=True)
    chat_rows = chat(args.chiar, system, tmp)
    evals = None
    if not args.skip_lm_eval:
        print("lm-eval ...", flush=True)
        # lengths 12 tokens apart: lm-eval sorts requests by length, so a document's 4 choices stay together
        contexts = [long_texts(args.chiar, args.context_tokens + 12 * k, 1 + k)[k] for k in range(args.docs)]
        write_task(tmp, contexts)
        evals = {cache: lm_eval(args.chiar, tmp, tmp, cache) for cache in (False, True)}
    print("capacity ...", flush=True)
    prompts = long_texts(args.chiar, args.prompt_tokens, args.capacity_prompts)
    cap = {
        "CHIAR": capacity(args.chiar, prompts, args.capacity_mb, tmp),
        "baseline": capacity(args.baseline, prompts, args.capacity_mb, tmp),
    }
    print("mixed load ...", flush=True)
    *texts, probe = long_texts(args.chiar, args.prompt_tokens, args.load_requests + 1)
    load = mixed_load(args.chiar, texts, probe, args.prompt_tokens, args.new_tokens, args.load_mb, tmp)
    print("designs ...", flush=True)
    args.threads = server_threads()
    design = designs(args.chiar, args.system_tokens)
    books = bookkeeping(args.chiar, args.system_tokens)
    body = render(args, relative({"CHIAR": args.chiar, "baseline": args.baseline}), chat_rows, evals, cap, load, design, books)
    print(body)
    if args.write:
        write_section(args.write, SECTION, body)
        print(f"wrote {args.write}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
