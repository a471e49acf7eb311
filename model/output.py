"""What a forward returns: logits, the routing of every token and the FLOPs it took."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import flops as fl
from .accounting import attended_pairs, attention_share, dense_flops, executed_flops
from .flops import FlopCount
from .operators import PAD

if TYPE_CHECKING:
    from .chiar import ChiarLM
    from .step import StepOutput


@dataclass
class RoutingInfo:
    """Per token and layer: operator id (`Operator`, -1 for padding) and entropy."""

    operator: Tensor  # [B, T, L] int8
    entropy: Tensor  # [B, T, L], NaN where not computed
    gate: Tensor  # [B, T] MetaRouter g, NaN where absent
    counts: Tensor  # [L, 4] valid tokens per (layer, operator id)

    def attention_share(self, layers: Iterable[int] | None = None) -> float:
        """Fraction of valid tokens routed to attention over `layers` (default: all; 0 without tokens)."""
        return attention_share(self.counts, layers) or 0.0


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    routing: RoutingInfo
    flops: FlopCount
    loss: Tensor | None = None
    aux_loss: Tensor | None = None


def assemble(model: ChiarLM, out: StepOutput, tokens: list[int], starts: list[int], heads: list[int], width: int,
             logits: str) -> ModelOutput:
    """The batch-shaped ModelOutput of a forward over B sequences that fed tokens[b] tokens after
    starts[b] earlier ones, padded to `width`. logits: "all" (out.logits has every token's), "last"
    (one per sequence) or "none". FLOPs are priced here, from the routing (`model.accounting`)."""
    cfg = model.config
    batch, n = len(tokens), sum(tokens)
    device = out.operator.device
    seq = torch.repeat_interleave(torch.arange(batch, device=device), torch.tensor(tokens, device=device))
    col = torch.cat([torch.arange(t, device=device) for t in tokens])
    dense = all(t == width for t in tokens)

    def padded(values: Tensor, fill: float) -> Tensor:
        if dense:
            return values.reshape(batch, width, *values.shape[1:])
        full = values.new_full((batch, width, *values.shape[1:]), fill)
        full[seq, col] = values
        return full

    if logits == "all":
        full_logits = padded(out.logits, 0.0)
    elif logits == "last":
        full_logits = out.logits.unsqueeze(1)
    else:
        full_logits = out.logits.new_zeros((batch, 0, cfg.vocab_size))
    gate = padded(out.gate, float("nan")) if out.gate is not None else torch.full((batch, width), float("nan"), device=device)
    routing = RoutingInfo(padded(out.operator, PAD), padded(out.entropy, float("nan")), gate, torch.tensor(out.counts))
    counts = out.span_counts.tolist()  # one span per sequence
    pairs = attended_pairs(out.keys_seen, seq, batch).tolist()
    flops, per_sequence = executed_flops(model.blocks, counts, pairs, model.metarouter is not None)
    head = fl.lm_head_flops(cfg.d_model, cfg.vocab_size, 1)
    flops.lm_head = head * sum(heads)
    dense_pairs = [t * s + t * (t + 1) / 2 for t, s in zip(tokens, starts)]
    flops.dense_per_layer = [dense_flops(cfg.d_model, cfg.d_ff, 1, n, sum(dense_pairs))] * cfg.n_layers
    flops.per_sequence_executed = [e + head * h for e, h in zip(per_sequence, heads)]
    flops.per_sequence_dense = [dense_flops(cfg.d_model, cfg.d_ff, cfg.n_layers, t, p) + head * h
                                for t, p, h in zip(tokens, dense_pairs, heads)]
    return ModelOutput(full_logits, routing, flops)
