"""What a forward returns: logits, the routing of every token and the FLOPs it took."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .flops import FlopCount
from .operators import Operator


@dataclass
class RoutingInfo:
    """Per token and layer: operator id (`Operator`, -1 for padding) and entropy."""

    operator: Tensor  # [B, T, L] int8
    entropy: Tensor  # [B, T, L], NaN where not computed
    gate: Tensor  # [B, T] MetaRouter g, NaN where absent
    counts: Tensor  # [L, 4] valid tokens per (layer, operator id)

    def attention_share(self, layers: slice | None = None) -> float:
        """Fraction of valid tokens routed to attention over the given layers (default: all)."""
        counts = self.counts[layers] if layers is not None else self.counts
        total = int(counts.sum())
        return float(counts[:, Operator.ATTENTION].sum()) / total if total else 0.0


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    routing: RoutingInfo
    flops: FlopCount
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
