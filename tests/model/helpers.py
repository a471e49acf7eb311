"""Helpers for model tests: tiny float64 models with thresholds that split tokens between operators."""

from __future__ import annotations

import torch

from model import ChiarConfig, ChiarLM
from model.scoring import right_pad

EVEN_SPLIT = {1: (0.5,), 2: (0.33, 0.67)}  # cut-point quantiles by the number of cut points (two or three operators)


def tiny_config(**overrides: object) -> ChiarConfig:
    base = dict(vocab_size=61, d_model=16, n_layers=4, n_heads=2, d_ff=24, max_seq_len=64, metarouter_bias_init=0.0)
    base.update(overrides)
    return ChiarConfig(**base)  # type: ignore[arg-type]


def _between(values: torch.Tensor, q: float) -> float:
    """A threshold near the q-quantile of `values`, in the middle of the widest nearby gap.

    It sits half a gap (far more than an ulp) from every observed value, so the 1-ulp differences
    between batched and solo matmuls cannot move a token across it.
    """
    ordered = values.flatten().unique()  # sorted, duplicates removed (per-token layers repeat values)
    n = ordered.numel()
    if n == 1:
        return float(ordered[0]) + 1e-3
    centre = min(max(round(q * n), 1), n - 1)
    reach = max(1, n // 10)
    candidates = range(max(1, centre - reach), min(n - 1, centre + reach) + 1)
    k = max(candidates, key=lambda i: float(ordered[i] - ordered[i - 1]))
    margin = float(ordered[k] - ordered[k - 1]) / 2
    assert margin > 1e-9 * max(1.0, float(ordered.abs().max())), "observed values too close to split safely"
    return float(ordered[k - 1]) + margin


def make_model(config: ChiarConfig, seed: int = 0, probe: torch.Tensor | None = None) -> ChiarLM:
    """A float64 model whose routers split `probe` tokens roughly in half at every routing layer,
    and whose MetaRouter gate is open for some tokens and closed for others."""
    torch.manual_seed(seed)
    model = ChiarLM(config).double().eval()
    if config.arch != "chiar":
        return model
    if model.metarouter is not None:
        model.metarouter.weight.data.normal_(0, 3.0)
    if probe is None:
        probe = torch.randint(0, config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for layer in config.routing_layers:
            router = model.blocks[layer].router
            entropy = model(probe, hard=True).routing.entropy[..., layer]
            quantiles = EVEN_SPLIT[len(router.cut_points())]
            router.set_cut_points([_between(entropy, q) for q in quantiles])
    return model


def right_padded_batch(lengths: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=gen)
    return right_pad([row[:n].tolist() for row, n in zip(drawn, lengths)])
