"""FLOPs of an inference call, priced from its routing result after the forward.

The forward only records which operator each token took and how many cache entries it attended
(`StepOutput.operator`, `.keys_seen`); here they become tokens per (sequence, layer, operator) and
attended (query, key) pairs per (sequence, layer), and each block's `executed_flops` prices them.
Pricing is linear in token counts and attended pairs, so the engine keeps the two tables per request
across its steps and prices their sums once, when the request ends (`server.engine.requests.RequestCost`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import flops as fl
from .operators import Operator

N_OPERATORS = len(Operator)


def routing_counts(operator: Tensor, batch_idx: Tensor, batch_size: int) -> Tensor:
    """operator [N, L] (flat tokens), batch_idx [N] -> tokens per (sequence, layer, operator) [B, L, 4]."""
    n_layers = operator.shape[1]
    layer = torch.arange(n_layers, device=operator.device)
    key = (batch_idx.unsqueeze(1) * n_layers + layer) * N_OPERATORS + operator.long()
    counts = torch.bincount(key.flatten(), minlength=batch_size * n_layers * N_OPERATORS)
    return counts.view(batch_size, n_layers, N_OPERATORS)


def attention_share(counts: Any, layers: Iterable[int] | None = None) -> float | None:
    """Share of the tokens of `layers` (default: every layer) that went to attention, from a count table
    [layer][operator id] (a tensor or nested lists, as `routing_counts` gives); None where they saw no token."""
    table = torch.as_tensor(counts, dtype=torch.float64).reshape(-1, N_OPERATORS)
    if layers is not None:
        table = table[list(layers)]
    total = float(table.sum())
    return float(table[:, Operator.ATTENTION].sum()) / total if total else None


def attended_pairs(keys_seen: Tensor, batch_idx: Tensor, batch_size: int) -> Tensor:
    """keys_seen [N, L] -> attended (query, key) pairs per (sequence, layer) [B, L]."""
    pairs = torch.zeros((batch_size, keys_seen.shape[1]), dtype=torch.float64, device=keys_seen.device)
    return pairs.index_add_(0, batch_idx, keys_seen.to(torch.float64))


def executed_flops(blocks: Sequence, counts: list[list[list[int]]], pairs: list[list[float]], gated: bool
                   ) -> tuple[fl.FlopCount, list[float]]:
    """Per-layer FLOPs and each sequence's share, from counts [B][L][4] and pairs [B][L]."""
    flops = fl.FlopCount.empty(len(blocks))
    per_sequence = [0.0] * len(counts)
    for b, (seq_counts, seq_pairs) in enumerate(zip(counts, pairs)):
        for layer, (block, n, p) in enumerate(zip(blocks, seq_counts, seq_pairs)):
            for key, value in block.executed_flops(n, p, gated).items():
                flops.per_layer[layer][key] += value
                per_sequence[b] += value
    return flops, per_sequence


class LinearPrice:
    """Executed FLOPs as one dot product. Pricing is linear in the counts and the attended pairs, so
    the price of one token per (layer, operator) and of one attended pair per layer is computed once per
    model, and a table prices without the per-layer Python of `executed_flops` (an engine prices every step)."""

    def __init__(self, blocks: Sequence, gated: bool) -> None:
        self.per_token = np.zeros((len(blocks), N_OPERATORS))
        self.per_pair = np.zeros(len(blocks))
        for layer, block in enumerate(blocks):
            for op in range(N_OPERATORS):
                one = [0] * N_OPERATORS
                one[op] = 1
                self.per_token[layer, op] = sum(block.executed_flops(one, 0.0, gated).values())
            self.per_pair[layer] = sum(block.executed_flops([0] * N_OPERATORS, 1.0, gated).values())

    def __call__(self, counts: np.ndarray, pairs: np.ndarray) -> float:
        """Executed FLOPs (LM head excluded) of counts [L, 4] and pairs [L]."""
        return float((counts * self.per_token).sum() + (pairs * self.per_pair).sum())


_PRICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def linear_price(model: torch.nn.Module) -> LinearPrice:
    """The model's `LinearPrice` (built on first use; its blocks and gating never change)."""
    price = _PRICES.get(model)
    if price is None:
        price = _PRICES[model] = LinearPrice(model.blocks, model.metarouter is not None)  # type: ignore[attr-defined]
    return price


def dense_flops(d_model: int, d_ff: int, n_layers: int, tokens: float, pairs: float) -> float:
    """What the full-attention baseline spends on `tokens` new tokens attending `pairs` pairs (no LM head)."""
    return n_layers * (fl.attention_flops(d_model, tokens, pairs) + fl.ffn_flops(d_model, d_ff, tokens))  # type: ignore[arg-type]
