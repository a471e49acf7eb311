"""ChiarConfig: the typed, validated model configuration (JSON round trip)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .operators import Operator

ARCHS = ("chiar", "baseline")
ROUTING_MODES = ("soft", "ste", "threshold", "threshold_reg")
OPERATOR_SETS = ((Operator.DCT, Operator.ATTENTION), (Operator.DCT, Operator.RBF, Operator.ATTENTION))
DTYPES = ("float32", "bfloat16", "float16", "float64")  # the one list of weight dtype names (config, --dtype, storage)


def routing_layers(n_layers: int, arch: str = "chiar") -> range:
    """0-based indices of the layers whose tokens are routed: 2..L-1 of a CHIAR model, none of the baseline."""
    return range(1, n_layers - 1) if arch == "chiar" else range(0)


class ConfigError(ValueError):
    """A config value is invalid; `field` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class ChiarConfig:
    """Hyper-parameters of a CHIAR-Former (or its full-attention baseline).

    Layer 1 is MetaRouter-gated DCT mixing, layers 2..L-1 route each token by spectral entropy,
    layer L is full attention. `thresholds` holds one tau per routing layer (n_layers - 2).
    """

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 8
    d_ff: int = 1024
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    arch: str = "chiar"
    routing: str = "threshold"
    operators: tuple[Operator, ...] = (Operator.DCT, Operator.ATTENTION)  # JSON: labels ("attn" accepted)
    thresholds: list[float] | None = None
    bands: list[list[float]] | None = None  # (p33, p67) per routing layer, three-operator router
    temperature: float = 0.05
    metarouter: bool = True
    metarouter_bias_init: float = 2.0
    target_attention_share: float = 0.5
    reg_weight: float = 0.1
    rbf_centers: int = 32
    norm_eps: float = 1e-5
    entropy_eps: float = 1e-8
    dropout: float = 0.0
    tie_embeddings: bool = True
    weights_dtype: str = "float32"  # dtype the checkpoint stores weights in
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (training recipe)

    def __post_init__(self) -> None:
        try:
            self.operators = tuple(Operator.parse(name) for name in self.operators)
        except (TypeError, ValueError) as exc:
            raise ConfigError("operators", str(exc)) from None
        if self.thresholds is not None:
            self.thresholds = [float(t) for t in self.thresholds]
        if self.bands is not None:
            self.bands = [[float(v) for v in band] for band in self.bands]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "rbf_centers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError("d_model", f"must be divisible by n_heads ({self.d_model} % {self.n_heads} != 0)")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("n_heads", "d_model / n_heads must be even for RoPE")
        if self.arch not in ARCHS:
            raise ConfigError("arch", f"must be one of {ARCHS}, got {self.arch!r}")
        if self.routing not in ROUTING_MODES:
            raise ConfigError("routing", f"must be one of {ROUTING_MODES}, got {self.routing!r}")
        if self.operators not in OPERATOR_SETS:
            sets = [[op.label for op in ops] for ops in OPERATOR_SETS]
            raise ConfigError("operators", f"must be one of {sets}, got {[op.label for op in self.operators]}")
        if self.arch == "chiar" and self.n_layers < 3:
            raise ConfigError("n_layers", f"chiar needs at least 3 layers (L1 gate, routing, final attention), got {self.n_layers}")
        for name in ("rope_theta", "temperature", "norm_eps", "entropy_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(name, f"must be a positive finite number, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < self.target_attention_share < 1.0:
            raise ConfigError("target_attention_share", f"must be in (0, 1), got {self.target_attention_share!r}")
        if self.reg_weight < 0:
            raise ConfigError("reg_weight", f"must be >= 0, got {self.reg_weight!r}")
        if not math.isfinite(self.metarouter_bias_init):
            raise ConfigError("metarouter_bias_init", "must be finite")
        if self.weights_dtype not in DTYPES:
            raise ConfigError("weights_dtype", f"must be one of {DTYPES}, got {self.weights_dtype!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(name, f"must be a token id in [0, vocab_size), got {value!r}")
        n_routing = self.n_routing_layers
        if self.thresholds is not None:
            if len(self.thresholds) != n_routing:
                raise ConfigError("thresholds", f"needs one value per routing layer ({n_routing}), got {len(self.thresholds)}")
            if not all(math.isfinite(t) for t in self.thresholds):
                raise ConfigError("thresholds", "values must be finite")
        if self.bands is not None:
            if len(self.bands) != n_routing or any(len(b) != 2 for b in self.bands):
                raise ConfigError("bands", f"needs one [p33, p67] pair per routing layer ({n_routing})")
            if any(not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi) for lo, hi in self.bands):
                raise ConfigError("bands", "each band must be finite with p33 <= p67")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def routing_layers(self) -> range:
        """0-based indices of the routing layers (2..L-1 of a CHIAR model; empty for the baseline)."""
        return routing_layers(self.n_layers, self.arch)

    @property
    def n_routing_layers(self) -> int:
        return len(self.routing_layers)

    @property
    def calibrated(self) -> bool:
        return self.thresholds is not None

    @property
    def three_operators(self) -> bool:
        return Operator.RBF in self.operators

    def resolved_thresholds(self) -> list[float]:
        """Thresholds to initialise routers with (0.5 when not calibrated yet)."""
        if self.thresholds is not None:
            return list(self.thresholds)
        if self.bands is not None:
            return [(lo + hi) / 2 for lo, hi in self.bands]
        return [0.5] * self.n_routing_layers

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["operators"] = [op.label for op in self.operators]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChiarConfig:
        if not isinstance(data, dict):
            raise ConfigError("config", f"must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown config key (known: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except TypeError as exc:  # wrong types that comparisons trip over
            raise ConfigError("config", str(exc)) from exc

    @classmethod
    def from_json(cls, text: str) -> ChiarConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("config", f"invalid JSON: {exc}") from exc
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ChiarConfig:
        return dataclasses.replace(self, **changes)
