"""FLOPs of an inference call, counted from its routing result after the forward.

The forward only records which operator each token took (`operator` [N, L]); here one bincount
turns that into tokens per (sequence, layer, operator), and each block's `executed_flops` prices
them. Attention pairs follow from those counts and the cache lengths after the call: a sequence
whose m new tokens attended in a layer whose cache now holds `after` entries attended
m * (after - m) + m (m + 1) / 2 (query, key) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import flops as fl
from .operators import Operator

N_OPERATORS = len(Operator)


def routing_counts(operator: Tensor, batch_idx: Tensor, batch_size: int) -> Tensor:
    """operator [N, L] (flat valid tokens), batch_idx [N] -> tokens per (sequence, layer, operator) [B, L, 4]."""
    n_layers = operator.shape[1]
    layer = torch.arange(n_layers, device=operator.device)
    key = (batch_idx.unsqueeze(1) * n_layers + layer) * N_OPERATORS + operator.long()
    counts = torch.bincount(key.flatten(), minlength=batch_size * n_layers * N_OPERATORS)
    return counts.view(batch_size, n_layers, N_OPERATORS)


def executed_flops(blocks: Sequence, counts: list[list[list[int]]], cache_after: list[list[int] | None] | None,
                   gated: bool) -> tuple[fl.FlopCount, list[float]]:
    """Per-layer FLOPs and each sequence's share, from counts [B][L][4] (`routing_counts(...).tolist()`).

    cache_after[l][b]: entries of sequence b's cache in layer l after the call (None for a layer
    without cache, or cache_after None: the call started from an empty cache, as a prefill does).
    """
    flops = fl.FlopCount.empty(len(blocks))
    per_sequence = [0.0] * len(counts)
    for b, seq_counts in enumerate(counts):
        for layer, (block, n) in enumerate(zip(blocks, seq_counts)):
            m = n[Operator.ATTENTION]
            lengths = cache_after[layer] if cache_after is not None else None
            after = lengths[b] if lengths is not None else m
            pairs = m * (after - m) + m * (m + 1) / 2
            for key, value in block.executed_flops(n, pairs, gated).items():
                flops.per_layer[layer][key] += value
                per_sequence[b] += value
    return flops, per_sequence
