"""The model's own decode step at batch 1 beside llama.cpp's `llama-bench` and Hugging Face's eager Llama.

All three decode 128 tokens after a 1-token prompt, one token per step, on the same CPU in one run:
- ours: `ChiarLM.forward_step` of each checkpoint (the server's forward, no server around it);
- `llama-bench -m <f32 GGUF> -p 0 -n 128 -t <threads>`: the same-size Llama (random weights, the
  baseline's shapes, bench.peers) converted to an f32 GGUF;
- HF: `LlamaForCausalLM` of the same shapes, eager, with its KV cache (`past_key_values`).

So the model's step and the server's overhead (bench-step's table, bench-server) are visible apart.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

TOKENS = 128


def ours(checkpoint: Path, threads: int, repeats: int = 5) -> float:
    """Median ms per decoded token of `forward_step` at batch 1."""
    from model import load_checkpoint
    from model.step import TokenBatch

    torch.set_num_threads(threads)
    model, _ = load_checkpoint(checkpoint)
    times = []
    for _ in range(repeats + 1):  # the first round pays for first-call costs
        cache = model.new_cache(rows=1, tokens_per_row=TOKENS + 1)
        row = cache.allocate()
        model.forward_step(TokenBatch.build(cache, [(row, [model.config.bos_token_id])], None), cache)
        token = 5
        start = time.perf_counter()
        for _ in range(TOKENS):
            logits = model.forward_step(TokenBatch.build(cache, [(row, [token])], None), cache).logits
            token = int(logits[0].argmax())
        times.append((time.perf_counter() - start) / TOKENS)
    return 1000 * statistics.median(times[1:])


def hf_eager(checkpoint: Path, threads: int, repeats: int = 5) -> float:
    """Median ms per decoded token of HF's eager Llama of the checkpoint's shapes, with its KV cache."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    cfg = json.loads((checkpoint / "config.json").read_text())
    model = LlamaForCausalLM(LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"], intermediate_size=cfg["d_ff"],
                                         num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
                                         num_key_value_heads=cfg["n_heads"], max_position_embeddings=cfg["max_seq_len"],
                                         tie_word_embeddings=True)).eval()
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            cache = DynamicCache()
            out = model(input_ids=torch.tensor([[cfg["bos_token_id"]]]), past_key_values=cache, use_cache=True)
            token = torch.tensor([[5]])
            start = time.perf_counter()
            for _ in range(TOKENS):
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            times.append((time.perf_counter() - start) / TOKENS)
    return 1000 * statistics.median(times[1:])


def llama_bench(checkpoint: Path, threads: int, work: Path) -> tuple[float, str] | None:
    """ms per token of `llama-bench -p 0 -n 128` on the same-size Llama's f32 GGUF (None: no build)."""
    from bench import llamacpp
    from bench.peers import same_size_llama

    try:
        build = llamacpp.ensure_built()
    except (RuntimeError, OSError) as exc:
        print(f"llama.cpp is not built ({exc}); skipping llama-bench", flush=True)
        return None
    gguf = llamacpp.convert_to_gguf(build, same_size_llama(checkpoint, work / "llama"), work / "llama-f32.gguf")
    cmd = [build.bench, "-m", str(gguf), "-p", "0", "-n", str(TOKENS), "-t", str(threads), "-r", "5", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)[0]
    described = f"`llama-bench -p 0 -n {TOKENS} -t {threads}` ({build.describe()})"
    return 1000.0 / float(result["avg_ts"]), described


def rows(chiar: Path, baseline: Path, threads: list[int]) -> tuple[list[dict], list[str]]:
    """One row per (model, threads): ms per decoded token; notes on how each was run."""
    table: list[dict] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in threads:
            table.append({"model": f"ours: {chiar.name}", "threads": t, "ms": ours(chiar, t)})
            table.append({"model": f"ours: {baseline.name}", "threads": t, "ms": ours(baseline, t)})
            table.append({"model": "HF LlamaForCausalLM, eager", "threads": t, "ms": hf_eager(baseline, t)})
            bench = llama_bench(baseline, t, Path(tmp))
            if bench is not None:
                table.append({"model": "llama.cpp llama-bench, f32 GGUF", "threads": t, "ms": bench[0]})
                notes.append(bench[1])
    return table, notes


def render(table: list[dict], notes: list[str]) -> str:
    lines = [f"Decode at batch 1, {TOKENS} tokens after a 1-token prompt, model only (no server), median of 5 runs; "
             "the peers are a Llama of the baseline's shapes with random weights.", "",
             "| model | threads | ms per token | tokens/s | vs llama-bench (same threads) |", "|---|---:|---:|---:|---:|"]
    ref = {r["threads"]: r["ms"] for r in table if r["model"].startswith("llama.cpp")}
    for r in table:
        ratio = f"{r['ms'] / ref[r['threads']]:.2f}x" if r["threads"] in ref else "-"
        lines.append(f"| {r['model']} | {r['threads']} | {r['ms']:.3f} | {1000 / r['ms']:,.0f} | {ratio} |")
    lines += ["", *(f"- {n}" for n in dict.fromkeys(notes))]
    return "\n".join(lines)
