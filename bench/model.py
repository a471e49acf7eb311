"""`make bench-model` (`python -m bench.model`): CHIAR hard-gated inference vs the full-attention baseline vs HF Llama, side by side.

Random weights at the benchmark size (d=256, L=8, 8 heads, d_ff=1024, vocab 8192); CHIAR thresholds
are set layer by layer to the median entropy of the benchmark input, so ~50% of tokens attend in
every routing layer. Medians of repeated runs; ratios come from the same process and machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from bench.report import interleaved_medians, machine_line, median_seconds, write_section
from model.chiar import ChiarLM
from model.config import ChiarConfig
from model.spectral import dct, entropy_from_coefficients
from training.calibrate import calibrated_random_model

PARTS = ("score", "decode", "overhead")
SIZE = dict(vocab_size=8192, d_model=256, n_layers=8, n_heads=8, d_ff=1024, max_seq_len=2048 + 64)


def build_models(seq: int, seed: int = 0) -> tuple[ChiarLM, ChiarLM, torch.nn.Module | None]:
    probe = torch.randint(0, SIZE["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(1))
    chiar = calibrated_random_model(ChiarConfig(**SIZE, arch="chiar", routing="threshold"), probe, seed)
    torch.manual_seed(seed)
    baseline = ChiarLM(ChiarConfig(**SIZE, arch="baseline")).eval()
    return chiar, baseline, build_hf_llama()


def build_hf_llama() -> torch.nn.Module | None:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    config = LlamaConfig(
        vocab_size=SIZE["vocab_size"], hidden_size=SIZE["d_model"], intermediate_size=SIZE["d_ff"],
        num_hidden_layers=SIZE["n_layers"], num_attention_heads=SIZE["n_heads"], num_key_value_heads=SIZE["n_heads"],
        max_position_embeddings=SIZE["max_seq_len"], tie_word_embeddings=True, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def scoring_rows(chiar: ChiarLM, baseline: ChiarLM, hf: torch.nn.Module | None, seqs: list[int], batches: list[int],
                 repeats: int) -> list[dict]:
    rows = []
    for seq in seqs:
        for batch in batches:
            ids = torch.randint(0, SIZE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seq + batch))
            with torch.inference_mode():
                out = chiar.infer(ids)
                base_out = baseline.infer(ids)
                fns = {"chiar": lambda ids=ids: chiar.infer(ids), "baseline": lambda ids=ids: baseline.infer(ids)}
                if hf is not None:
                    fns["hf"] = lambda ids=ids: hf(ids).logits
                medians = interleaved_medians(fns, repeats)
                t_chiar, t_base, t_hf = medians["chiar"], medians["baseline"], medians.get("hf", float("nan"))
            tokens = batch * seq
            rows.append(dict(
                seq=seq, batch=batch, chiar=tokens / t_chiar, baseline=tokens / t_base, hf=tokens / t_hf,
                share=out.routing.attention_share(chiar.config.routing_layers), flops_ratio=out.flops.executed / base_out.flops.executed,
            ))
            print(
                f"score seq={seq} batch={batch}: chiar {tokens / t_chiar:,.0f} tok/s, baseline {tokens / t_base:,.0f}, "
                f"hf {tokens / t_hf:,.0f}; attention share {rows[-1]['share']:.2f}, FLOPs ratio {rows[-1]['flops_ratio']:.3f}",
                flush=True,
            )
    return rows


def _decoder(model: ChiarLM, ids: torch.Tensor, steps: int) -> tuple[Callable[[], None], float]:
    """A function decoding `steps` more greedy tokens of one running batch, and the KV bytes/seq after prefill."""
    _, state = model.prefill(ids)
    last = [torch.zeros(ids.shape[0], dtype=torch.long)]

    def run() -> None:
        tokens = last[0]
        for _ in range(steps):
            tokens = model.decode_step(tokens, state).logits[:, 0].argmax(-1)
        last[0] = tokens

    return run, float(state.kv_cache_bytes().float().mean())


def _hf_decoder(hf: torch.nn.Module, ids: torch.Tensor, steps: int) -> tuple[Callable[[], None], float]:
    out = hf(ids, use_cache=True)
    running = [out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)]

    def run() -> None:
        past, tokens = running
        for _ in range(steps):
            out = hf(tokens, past_key_values=past, use_cache=True)
            past, tokens = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        running[:] = [past, tokens]

    d, layers = SIZE["d_model"], SIZE["n_layers"]
    return run, float(2 * layers * d * ids.shape[1] * 4)  # K and V, fp32, every layer, every token


def decode_rows(
    chiar: ChiarLM, baseline: ChiarLM, hf: torch.nn.Module | None, context: int, batches: list[int], steps: int, repeats: int
) -> list[dict]:
    """Greedy decode tokens/s: blocks of `steps` steps per model, round-robin over the models (`repeats`
    blocks each, after one warm-up block), each model continuing its own running batch; medians."""
    rows = []
    for batch in batches:
        ids = torch.randint(0, SIZE["vocab_size"], (batch, context), generator=torch.Generator().manual_seed(batch))
        result: dict = dict(batch=batch, context=context, hf=float("nan"), hf_kv=float("nan"))
        with torch.inference_mode():
            fns = {}
            for name, model in (("chiar", chiar), ("baseline", baseline)):
                fns[name], result[f"{name}_kv"] = _decoder(model, ids, steps)
            if hf is not None:
                fns["hf"], result["hf_kv"] = _hf_decoder(hf, ids, steps)
            for name, seconds in interleaved_medians(fns, repeats).items():
                result[name] = batch * steps / seconds
        rows.append(result)
        print(
            f"decode batch={batch} ctx={context}: chiar {result['chiar']:,.1f} tok/s, baseline {result['baseline']:,.1f}, "
            f"hf {result['hf']:,.1f}; KV bytes/seq chiar {result['chiar_kv']:,.0f} baseline {result['baseline_kv']:,.0f}",
            flush=True,
        )
    return rows


def routing_overhead(chiar: ChiarLM, seq: int, batch: int, repeats: int) -> dict:
    """Cost of routing in one routing layer (DCT, entropy, decision, gather and scatter) vs the attention
    it saves, each through the model's own kernels (native on a float32 CPU model)."""
    block = chiar.routed_blocks()[0]
    layer = list(chiar.blocks).index(block)
    kernels = chiar.kernels
    d = SIZE["d_model"]
    u = torch.randn(batch * seq, d)
    rows = torch.arange(batch).repeat_interleave(seq)
    positions = torch.arange(seq).repeat(batch)
    entropy = torch.empty(batch * seq, dtype=torch.float32)
    operator = torch.empty(batch * seq, dtype=torch.int8)
    with torch.inference_mode():
        tau = float(entropy_from_coefficients(dct(u)).median())
        block.router.threshold.fill_(tau)
        kernels.refresh()

        def route() -> None:
            coefficients, _ = kernels.spectral(layer, block, u, entropy, operator)
            sel = (operator == 3).nonzero().squeeze(1)
            y = torch.empty_like(u)
            y.index_copy_(0, sel, u.index_select(0, sel))  # the gather of the attending tokens and the scatter back
            del coefficients

        def attend(sel: torch.Tensor) -> None:
            cache = chiar.new_cache(batch, seq, growable=True)
            for _ in range(batch):
                cache.allocate()
            kernels.attention(layer, block.attention, u.index_select(0, sel), u.index_select(0, sel), rows[sel], positions[sel], cache)

        kernels.spectral(layer, block, u, entropy, operator)
        sel = (operator == 3).nonzero().squeeze(1)
        rest = (operator != 3).nonzero().squeeze(1)
        coefficients = dct(u)
        t_route = median_seconds(route, repeats)
        t_full = median_seconds(lambda: attend(torch.arange(batch * seq)), repeats)
        t_half = median_seconds(lambda: attend(sel), repeats)
        t_dct = median_seconds(lambda: kernels.dct_mix(layer, block, coefficients[rest], u[rest]), repeats)
    return dict(
        seq=seq,
        batch=batch,
        overhead_ms=t_route * 1e3,
        attention_full_ms=t_full * 1e3,
        attention_half_ms=t_half * 1e3,
        dct_mix_ms=t_dct * 1e3,
    )


def render(score: list[dict], decode: list[dict], overhead: list[dict]) -> str:
    lines = [
        "## Model: CHIAR hard-gated inference vs baseline vs HF Llama (`make bench-model`)",
        "",
        f"Machine: {machine_line()}.",
        "Size: d=256, L=8, 8 heads, d_ff=1024, vocab 8192, fp32, random weights; CHIAR thresholds at the",
        "median entropy of each routing layer (~50% attention routing). Medians of repeated runs.",
        "",
        "### Scoring (prefill / perplexity) tokens/s",
        "",
        "| seq | batch | CHIAR | baseline | HF Llama | CHIAR / baseline | baseline / HF | "
        "attention share (routing layers) | executed FLOPs CHIAR / baseline |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in score:
        lines.append(
            f"| {r['seq']} | {r['batch']} | {r['chiar']:,.0f} | {r['baseline']:,.0f} | {r['hf']:,.0f} | "
            f"{r['chiar'] / r['baseline']:.2f}x | {r['baseline'] / r['hf']:.2f}x | {r['share']:.2f} | {r['flops_ratio']:.3f} |"
        )
    lines += [
        "",
        "### Decode tokens/s and KV cache",
        "",
        "| context | batch | CHIAR | baseline | HF Llama | CHIAR / baseline | baseline / HF | "
        "KV bytes/seq CHIAR | KV bytes/seq baseline | KV ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in decode:
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['chiar']:,.1f} | {r['baseline']:,.1f} | {r['hf']:,.1f} | "
            f"{r['chiar'] / r['baseline']:.2f}x | {r['baseline'] / r['hf']:.2f}x | {r['chiar_kv']:,.0f} | "
            f"{r['baseline_kv']:,.0f} | {r['chiar_kv'] / r['baseline_kv']:.3f} |"
        )
    lines += [
        "",
        "### Routing overhead in one routing layer (ms)",
        "",
        "DCT + entropy + compaction + scatter, against the attention it saves (full attention minus attention on",
        "the routed half) and the DCT mixing the other half then needs.",
        "",
        "| seq | batch | routing overhead | attention, all tokens | "
        "attention, routed half | saved by routing | DCT mix of the other half | net saving |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in overhead:
        saved = r["attention_full_ms"] - r["attention_half_ms"]
        net = saved - r["overhead_ms"] - r["dct_mix_ms"]
        lines.append(
            f"| {r['seq']} | {r['batch']} | {r['overhead_ms']:.2f} | {r['attention_full_ms']:.2f} | "
            f"{r['attention_half_ms']:.2f} | {saved:.2f} | {r['dct_mix_ms']:.2f} | {net:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="write the tables into this markdown file")
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="tables to measure (e.g. `--only decode --batches 1` for the decode-at-1k row)",
    )
    parser.add_argument("--no-hf", action="store_true", help="leave HF Llama out (faster; its columns read nan)")
    args = parser.parse_args()
    if args.write and set(args.only) != set(PARTS):
        parser.error("--write needs every table (leave out --only)")
    chiar, baseline, hf = build_models(max(args.seqs))
    hf = None if args.no_hf else hf
    print(
        f"params: CHIAR {chiar.num_parameters():,}, baseline {baseline.num_parameters():,}"
        + (f", HF Llama {sum(p.numel() for p in hf.parameters()):,}" if hf is not None else ""),
        flush=True,
    )
    score = scoring_rows(chiar, baseline, hf, args.seqs, args.batches, args.repeats) if "score" in args.only else []
    decode = decode_rows(chiar, baseline, hf, args.context, args.batches, args.decode_steps, args.repeats) if "decode" in args.only else []
    overhead = []
    if "overhead" in args.only:
        overhead = [routing_overhead(chiar, seq, 1, args.repeats) for seq in args.seqs]
        overhead.append(routing_overhead(chiar, max(args.seqs), max(args.batches), args.repeats))
    body = render(score, decode, overhead)
    print(body)
    if args.write:
        write_section(args.write, "bench-model", body)


if __name__ == "__main__":
    main()
