"""FLOP accounting: what ran (executed) against what the full-attention baseline spends (dense).

A multiply-add counts 2 FLOPs. Attention scores count the causal (query, key) pairs that are
actually attended (QK^T and AV: 4 d FLOPs a pair). The DCT is a d x d matmul (that is the
implementation that runs), so a transform costs 2 d^2 a token; entropy ~5 d; norms and
activations are ignored on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .operators import Operator

# FlopCount.per_layer keys: the operators that do work, then the routing and FFN cost every token pays.
FLOP_KEYS = (Operator.ATTENTION.label, Operator.DCT.label, Operator.RBF.label, "router", "ffn")


def causal_pairs(lengths: list[int]) -> int:
    """(query, key) pairs of full causal attention over sequences of these lengths."""
    return sum(n * (n + 1) // 2 for n in lengths)


def attention_flops(d: int, projected_tokens: int, attended_pairs: int) -> float:
    return 8.0 * d * d * projected_tokens + 4.0 * d * attended_pairs


def transform_flops(d: int, tokens: int) -> float:
    """One DCT or IDCT (matmul with the cached d x d matrix)."""
    return 2.0 * d * d * tokens


def entropy_flops(d: int, tokens: int) -> float:
    return 5.0 * d * tokens


def ffn_flops(d: int, d_ff: int, tokens: int) -> float:
    """SwiGLU: gate, up and down projections."""
    return 6.0 * d * d_ff * tokens


def rbf_flops(d: int, n_centers: int, tokens: int) -> float:
    return 4.0 * d * n_centers * tokens


def lm_head_flops(d: int, vocab_size: int, tokens: float) -> float:
    return 2.0 * d * vocab_size * tokens


@dataclass
class FlopCount:
    """Executed and dense-baseline-equivalent FLOPs, with a per-layer, per-operator breakdown."""

    per_layer: list[dict[str, float]] = field(default_factory=list)
    dense_per_layer: list[float] = field(default_factory=list)
    lm_head: float = 0.0
    # Inference path only: each sequence's own share (exact, independent of its batch neighbours).
    per_sequence_executed: list[float] = field(default_factory=list)
    per_sequence_dense: list[float] = field(default_factory=list)

    @staticmethod
    def empty(n_layers: int) -> FlopCount:
        return FlopCount([dict.fromkeys(FLOP_KEYS, 0.0) for _ in range(n_layers)], [0.0] * n_layers)

    def add(self, layer: int, operator: str, flops: float) -> None:
        self.per_layer[layer][operator] += float(flops)

    @property
    def executed(self) -> float:
        return sum(sum(layer.values()) for layer in self.per_layer) + self.lm_head

    @property
    def dense(self) -> float:
        return sum(self.dense_per_layer) + self.lm_head

    @property
    def ratio(self) -> float:
        return self.executed / self.dense if self.dense else 1.0

    def __iadd__(self, other: FlopCount) -> FlopCount:
        for mine, theirs in zip(self.per_layer, other.per_layer):
            for key, value in theirs.items():
                mine[key] += value
        self.dense_per_layer = [a + b for a, b in zip(self.dense_per_layer, other.dense_per_layer)]
        self.lm_head += other.lm_head
        if self.per_sequence_executed and len(self.per_sequence_executed) == len(other.per_sequence_executed):
            self.per_sequence_executed = [a + b for a, b in zip(self.per_sequence_executed, other.per_sequence_executed)]
            self.per_sequence_dense = [a + b for a, b in zip(self.per_sequence_dense, other.per_sequence_dense)]
        return self

    def to_dict(self) -> dict[str, object]:
        return {"executed": self.executed, "dense": self.dense, "ratio": self.ratio, "per_layer": self.per_layer,
                "lm_head": self.lm_head, "per_sequence_executed": self.per_sequence_executed,
                "per_sequence_dense": self.per_sequence_dense}
