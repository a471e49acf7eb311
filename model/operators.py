"""The token operators a CHIAR layer can route a token to: one enum, one spelling.

The integer ids are what `RoutingInfo.operator` holds, what checkpoints and API payloads carry and
what the metrics index by; `.label` is the one spelling of each operator in configs, API payloads
and Prometheus labels. Old configs spell attention "attn": `Operator.parse` accepts that alias at
the boundary (config.json / YAML), nothing else does.
"""

from __future__ import annotations

from enum import IntEnum

PAD = -1  # RoutingInfo.operator of a padding position (no operator)
_ALIASES = {"attn": "attention"}


class Operator(IntEnum):
    IDENTITY = 0  # layer 1 with a closed MetaRouter gate: the token passes unmixed
    DCT = 1
    RBF = 2
    ATTENTION = 3

    @property
    def label(self) -> str:
        """"identity", "dct", "rbf" or "attention"."""
        return self.name.lower()

    @classmethod
    def parse(cls, name: str | Operator) -> Operator:
        """An operator from its label (or the legacy alias "attn"); ValueError names the bad value."""
        if isinstance(name, Operator):
            return name
        if not isinstance(name, str):
            raise ValueError(f"operator names must be strings, got {name!r}")
        label = _ALIASES.get(name, name)
        for op in cls:
            if op.label == label:
                return op
        raise ValueError(f"unknown operator {name!r} (known: {', '.join(op.label for op in cls)})")


OPERATOR_LABELS: tuple[str, ...] = tuple(op.label for op in Operator)  # index = operator id
