"""Read the server's /metrics: routed tokens per layer/operator, routing share, token counters."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Snapshot:
    """Counters of one /metrics scrape that the load-test summary needs."""

    routed: dict[tuple[int, str, str], float] = field(default_factory=dict)  # (layer, operator, phase) -> tokens
    generation_tokens: float = 0.0
    prompt_tokens: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)  # reason -> failed requests
    arch: str | None = None
    names: set[str] = field(default_factory=set)  # every sample name in the scrape

    @property
    def n_layers(self) -> int:
        """Number of layers seen in chiar_tokens_routed_total."""
        return max((layer for layer, _, _ in self.routed), default=0)

    def per_operator(self, layers: range | None = None) -> dict[str, float]:
        """Tokens per operator, summed over phases and the given layers (default all)."""
        out: dict[str, float] = {}
        for (layer, op, _), n in self.routed.items():
            if layers is None or layer in layers:
                out[op] = out.get(op, 0.0) + n
        return out

    def routing_share(self) -> dict[str, float] | None:
        """Share of each operator in the routing layers 2..L-1 (None if no routing traffic)."""
        counts = self.per_operator(range(2, self.n_layers))
        total = sum(counts.values())
        if total <= 0:
            return None
        return {op: n / total for op, n in sorted(counts.items())}

    def minus(self, before: Snapshot) -> Snapshot:
        """Counter increase since ``before``."""
        routed = {k: v - before.routed.get(k, 0.0) for k, v in self.routed.items()}
        errors = {k: v - before.errors.get(k, 0.0) for k, v in self.errors.items()}
        return Snapshot(routed=routed, generation_tokens=self.generation_tokens - before.generation_tokens,
                        prompt_tokens=self.prompt_tokens - before.prompt_tokens, errors=errors, arch=self.arch,
                        names=self.names)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Prometheus text exposition as {(sample name, sorted (label, value) pairs): value}: the one parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def parse(text: str) -> Snapshot:
    """Parse Prometheus text exposition from the server."""
    snap = Snapshot()
    for (name, label_pairs), value in samples(text).items():
        labels = dict(label_pairs)
        snap.names.add(name)
        if name == "chiar_tokens_routed_total":
            snap.routed[(int(labels["layer"]), labels["operator"], labels["phase"])] = value
        elif name == "chiar_generation_tokens_total":
            snap.generation_tokens = value
        elif name == "chiar_prompt_tokens_total":
            snap.prompt_tokens = value
        elif name == "chiar_request_errors_total":
            snap.errors[labels["reason"]] = snap.errors.get(labels["reason"], 0.0) + value
        elif name == "chiar_model_info":
            snap.arch = labels.get("arch")
    return snap
