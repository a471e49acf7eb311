"""Routes to the step's matrix products, and torch.compile against the native kernels (`make bench-compile`).

1. Matrix products at batch 1, 8 and 32 over the checkpoint's 25 weight matrices, in GB/s of weights
   read (llama.cpp reads the same f32 model at ~33 GB/s on this CPU): stock `F.linear` in fp32 and
   bf16, oneDNN's prepacked linear, inductor with max-autotune (its CPU GEMM templates), and the
   native packed panels in fp32 and bf16.
2. The dense parts of a decode step:

The fast-step issue asks for inductor on the dense parts of a step (norms, projections, FFN, the DCT
with its entropy, the LM head), with routed counts padded to buckets. This measures, on a demo
checkpoint's weights and the same CPU, each dense part at batch 1 and 32 as eager aten ops, as
`torch.compile` (inductor, default and max-autotune without CUDA graphs) and as the native kernel the
engine runs, plus the cost of calling an empty compiled graph: a routed step needs one compiled
region per routing decision (a host read per routing layer sizes the work), so that per-call cost
is paid ~15 times a step.

    python -m bench.compile_probe [--checkpoint checkpoints/chiar-small] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from loadtests.server_process import ROOT
from model.spectral import dct_matrix


def micros(fn: Callable[[], object], repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    runs = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        runs.append((time.perf_counter() - start) / repeats)
    return 1e6 * statistics.median(runs)


def parts(model: torch.nn.Module) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]]:
    """Dense parts of a decode step as eager functions of x [B, d], and the native kernel name that does each."""
    block = model.routed_blocks()[0] if model.config.arch == "chiar" else model.blocks[1]
    cfg = model.config

    dct = dct_matrix(cfg.d_model)

    def ffn(x: torch.Tensor) -> torch.Tensor:
        u = F.rms_norm(x, (cfg.d_model,), block.ffn_norm.weight, cfg.norm_eps)
        gate, up = F.linear(u, block.ffn.w_in.weight).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, block.ffn.w_out.weight)

    def norm_dct_entropy(x: torch.Tensor) -> torch.Tensor:
        u = F.rms_norm(x, (cfg.d_model,), block.mixer_norm.weight, cfg.norm_eps)
        coefficients = u @ dct.T
        power = coefficients.square() + cfg.entropy_eps
        p = power / power.sum(-1, keepdim=True)
        return -(p * p.log()).sum(-1)

    def head(x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.rms_norm(x, (cfg.d_model,), model.final_norm.weight, cfg.norm_eps), model.lm_head.weight)

    return {"FFN (norm, SwiGLU, residual)": (ffn, "ffn"), "norm + DCT + entropy": (norm_dct_entropy, "route"),
            "final norm + LM head": (head, "logits")}


def native_part(model: torch.nn.Module, name: str) -> Callable[[torch.Tensor], object]:
    kernels = model.kernels
    layer = next(i for i, b in enumerate(model.blocks) if b.has_attention and i > 0)
    block = model.blocks[layer]
    if name == "ffn":
        return lambda x: kernels.ffn(layer, block, x)
    if name == "logits":
        return lambda x: kernels.logits(model, x)
    entropy, operator = torch.empty(32), torch.empty(32, dtype=torch.int8)
    return lambda x: kernels.spectral(layer, block, kernels.rms_norm(block.mixer_norm, x), entropy[: x.shape[0]], operator[: x.shape[0]])


def matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weight matrices one decode step reads: per layer the attention or mixing ones and the FFN, and the LM head."""
    out = []
    for block in model.blocks:
        if block.has_attention:
            out += [block.attention.qkv.weight, block.attention.out.weight]
        out += [block.ffn.w_in.weight, block.ffn.w_out.weight]
    return [*out, model.lm_head.weight]


def gemv_routes(checkpoint: Path, batches: list[int]) -> list[dict]:
    """ms and GB/s (weights read once per call) of each route over the model's matrices."""
    from model import load_checkpoint, native

    model, _ = load_checkpoint(checkpoint.parent / "baseline-small" if checkpoint.name != "baseline-small" else checkpoint)
    weights = [w.detach().contiguous() for w in matrices(model)]
    bf16 = [w.to(torch.bfloat16) for w in weights]
    lib = native.load()
    packed32 = [lib.pack(w, False) for w in weights]
    packed16 = [lib.pack(w, True) for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    rows = []
    for batch in batches:
        for name, (fn, element) in _routes(batch, weights, bf16, onednn, packed32, packed16, lib).items():
            us = micros(fn, 20)
            nbytes = sum(w.numel() for w in weights) * element
            rows.append({"route": name, "batch": batch, "ms": us / 1000, "gbs": nbytes / us / 1000})
            print(rows[-1], flush=True)
    return rows


def _chain(xs: list[torch.Tensor], ws: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.linear(x, w) for x, w in zip(xs, ws)]  # returned: a compiled chain must not drop them as dead code


def _routes(batch: int, weights: list, bf16: list, onednn: list, packed32: list, packed16: list,
            lib: object) -> dict[str, tuple[Callable[[], object], int]]:
    """Each route over the matrices at `batch` rows, with the bytes a weight element takes."""
    xs = [torch.randn(batch, w.shape[1]) for w in weights]
    xs16 = [x.to(torch.bfloat16) for x in xs]
    torch._dynamo.reset()
    tuned = torch.compile(_chain, dynamic=False, mode="max-autotune-no-cudagraphs")
    tuned(xs, weights)
    return {
        "F.linear fp32": (lambda: _chain(xs, weights), 4),
        "F.linear bf16": (lambda: _chain(xs16, bf16), 2),
        "oneDNN prepacked fp32": (lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for x, w in zip(xs, onednn)], 4),
        "inductor max-autotune fp32": (lambda: tuned(xs, weights), 4),
        "native panels fp32": (lambda: [lib.linear(x, w) for x, w in zip(xs, packed32)], 4),  # type: ignore[attr-defined]
        "native panels bf16": (lambda: [lib.linear(x, w) for x, w in zip(xs, packed16)], 2),  # type: ignore[attr-defined]
    }


def render_routes(rows: list[dict]) -> str:
    lines = ["| route | batch | ms (25 matrices) | GB/s of weights |", "|---|---:|---:|---:|"]
    lines += [f"| {r['route']} | {r['batch']} | {r['ms']:.3f} | {r['gbs']:.1f} |" for r in rows]
    return "\n".join(lines)


def measure(checkpoint: Path, batches: list[int]) -> list[dict]:
    from model import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    model.set_kernels("native")
    torch.set_grad_enabled(False)
    rows = []
    empty = torch.compile(lambda x: x + 1, fullgraph=True, dynamic=False)
    probe = torch.zeros(1, 4)
    empty(probe)
    rows.append({"part": "an empty compiled graph (x + 1): the cost of one compiled call", "batch": 1, "eager": micros(lambda: probe + 1),
                 "compiled": micros(lambda: empty(probe)), "autotuned": float("nan"), "native": float("nan"), "compile_s": float("nan")})
    for name, (fn, kernel) in parts(model).items():
        for batch in batches:
            rows.append(measure_part(name, fn, native_part(model, kernel), torch.randn(batch, model.config.d_model)))
            print(rows[-1], flush=True)
    return rows


def measure_part(name: str, fn: Callable[[torch.Tensor], object], native: Callable[[torch.Tensor], object], x: torch.Tensor) -> dict:
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    compiled(x)
    compile_s = time.perf_counter() - start
    tuned = torch.compile(fn, fullgraph=True, dynamic=False, mode="max-autotune-no-cudagraphs")
    tuned(x)
    return {"part": name, "batch": x.shape[0], "eager": micros(lambda: fn(x)), "compiled": micros(lambda: compiled(x)),
            "autotuned": micros(lambda: tuned(x)), "native": micros(lambda: native(x)), "compile_s": compile_s}


def render(rows: list[dict]) -> str:
    lines = ["| dense part | batch | eager aten µs | torch.compile µs | max-autotune µs | native µs | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def cell(v: float, fmt: str = "{:.0f}") -> str:
        return "-" if v != v else fmt.format(v)

    for r in rows:
        lines.append(f"| {r['part']} | {r['batch']} | {cell(r['eager'])} | {cell(r['compiled'])} | {cell(r['autotuned'])} | "
                     f"{cell(r['native'])} | {cell(r['compile_s'], '{:.1f}')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "chiar-small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    routes = render_routes(gemv_routes(args.checkpoint, [1, 8, 32]))
    text = render(measure(args.checkpoint, args.batches))
    print(routes, text, sep="\n\n")
    if args.write:
        from bench.report import machine_line, write_section

        write_section(args.write, "bench-compile", f"{machine_line()}\n\n### Matrix products: routes (baseline-small's 25 "
                      f"matrices, one call each, median of 7 x 20)\n\n{routes}\n\n### Dense parts of a decode step: eager, "
                      f"torch.compile, native (checkpoint `{args.checkpoint.name}`, fp32, median of 7 x 200 calls; inductor's "
                      f"C++ backend for the CPU)\n\n{text}\n")


if __name__ == "__main__":
    main()
