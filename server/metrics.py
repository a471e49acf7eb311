"""Prometheus metrics: the names, types and labels of docs/ARCHITECTURE.md (Serving contract), plus the engine's step metrics."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import HistogramMetricFamily

from model.operators import OPERATOR_LABELS

OPERATORS = OPERATOR_LABELS  # Operator labels, index = operator id (Prometheus and API spelling)
PHASES = ("prefill", "decode")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_TOKEN_BUCKETS = (0, 1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
GATE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class BulkHistogram:
    """A label-less histogram observed a tensor at a time (one MetaRouter gate per token)."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = [float(b) for b in buckets]
        self._edges = torch.tensor(self.bounds, dtype=torch.float64)
        self._counts = [0] * (len(self.bounds) + 1)  # last = +Inf overflow
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: torch.Tensor) -> None:
        values = values.detach().reshape(-1).to("cpu", torch.float64)
        values = values[~torch.isnan(values)]
        if values.numel() == 0:
            return
        index = torch.bucketize(values, self._edges)  # first bucket with value <= bound
        counts = torch.bincount(index, minlength=len(self._counts)).tolist()
        with self._lock:
            for i, c in enumerate(counts):
                self._counts[i] += c
            self._sum += float(values.sum())

    def collect(self) -> list[HistogramMetricFamily]:
        with self._lock:
            cumulative, running = [], 0
            for bound, count in zip([*self.bounds, float("inf")], self._counts):
                running += count
                cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
            total = self._sum
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], cumulative, total)
        return [family]

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation)]


class Metrics:
    """All chiar_* metrics in their own registry (served by GET /metrics)."""

    def __init__(self, n_layers: int, device: str) -> None:
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.device = device
        r = self.registry
        self.tokens_routed = Counter("chiar_tokens_routed_total", "Tokens processed per layer and operator (hard gating).",
                                     ["layer", "operator", "phase"], registry=r)
        self.metarouter_gate = BulkHistogram("chiar_metarouter_gate", "MetaRouter gate g per token (layer 1).", GATE_BUCKETS)
        r.register(self.metarouter_gate)
        self.forward_latency = Histogram("chiar_forward_latency_seconds", "Model forward time (CUDA events on GPU, wall clock on CPU).",
                                         ["phase", "device"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_duration = Histogram("chiar_request_duration_seconds", "HTTP request duration.", ["endpoint", "status"],
                                          buckets=REQUEST_BUCKETS, registry=r)
        self.ttft = Histogram("chiar_time_to_first_token_seconds", "Arrival to first generated token.", buckets=REQUEST_BUCKETS, registry=r)
        self.inter_token = Histogram("chiar_inter_token_latency_seconds", "Time between consecutive generated tokens of a request.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("chiar_queue_wait_seconds", "Arrival to admission into the running batch.", buckets=REQUEST_BUCKETS, registry=r)
        self.running = Gauge("chiar_requests_running", "Sequences being decoded or scored.", registry=r)
        self.waiting = Gauge("chiar_requests_waiting", "Sequences waiting for admission.", registry=r)
        self.batch_size = Histogram("chiar_batch_size", "Sequences per forward.", ["phase"], buckets=BATCH_BUCKETS, registry=r)
        self.prompt_tokens = Counter("chiar_prompt_tokens_total", "Prompt/scored input tokens processed (BOS included).", registry=r)
        self.generation_tokens = Counter("chiar_generation_tokens_total", "Tokens generated.", registry=r)
        self.flops = Counter("chiar_flops_total", "FLOPs executed and what the dense baseline would spend.", ["kind"], registry=r)
        self.request_errors = Counter("chiar_request_errors_total", "Failed requests.", ["endpoint", "reason"], registry=r)
        self.queue_length = Gauge("chiar_queue_length", "Requests waiting for admission, per class.", ["class"], registry=r)
        self.step_tokens = Histogram("chiar_step_tokens", "Tokens one engine step processed, per kind (decode, prefill, score).",
                                     ["kind"], buckets=STEP_TOKEN_BUCKETS, registry=r)
        self.step_seconds = Histogram("chiar_step_seconds", "Engine step time (model calls and output processing).",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.step_budget = Gauge("chiar_step_budget_tokens", "Prefill + scoring tokens the next step may spend.", registry=r)
        self.steps = Counter("chiar_steps_total", "Engine steps, by whether generation ran and whether scoring ran.",
                             ["generation", "scoring"], registry=r)
        self.step_over_budget = Counter("chiar_step_over_budget_total", "Steps whose prefill + scoring tokens exceeded the budget.",
                                        registry=r)
        self.max_step_score_tokens = Gauge("chiar_step_score_tokens_max", "Most scoring tokens one step processed while "
                                           "sequences were decoding (since start).", registry=r)
        self.kv_cache = Gauge("chiar_kv_cache_bytes", "KV-cache bytes held by running sequences, and the budget.", ["kind"], registry=r)
        self.model_info = Gauge("chiar_model_info", "Served model (value 1).", ["arch", "params", "checkpoint"], registry=r)
        for layer in range(1, n_layers + 1):
            for op in OPERATORS:
                for phase in PHASES:
                    self.tokens_routed.labels(str(layer), op, phase)
        for phase in PHASES:
            self.forward_latency.labels(phase, device)
            self.batch_size.labels(phase)
        for kind in ("executed", "dense_equivalent"):
            self.flops.labels(kind)
        for cls in ("generate", "score"):
            self.queue_length.labels(cls)
        for kind in ("decode", "prefill", "score"):
            self.step_tokens.labels(kind)
        for kind in ("used", "limit"):
            self.kv_cache.labels(kind)
        self._max_score = 0

    def record_step(self, decode: int, prefill: int, score: int, budget: int, seconds: float, kv_used: int, kv_limit: int) -> None:
        """One engine step's composition and time."""
        self.step_tokens.labels("decode").observe(decode)
        self.step_tokens.labels("prefill").observe(prefill)
        self.step_tokens.labels("score").observe(score)
        self.step_seconds.observe(seconds)
        self.steps.labels(str(decode > 0 or prefill > 0).lower(), str(score > 0).lower()).inc()
        if prefill + score > budget:
            self.step_over_budget.inc()
        if decode and score > self._max_score:
            self._max_score = score
            self.max_step_score_tokens.set(score)
        self.kv_cache.labels("used").set(kv_used)
        self.kv_cache.labels("limit").set(kv_limit)

    def update_queues(self, waiting_generate: int, waiting_score: int, running: int, budget: int) -> None:
        self.queue_length.labels("generate").set(waiting_generate)
        self.queue_length.labels("score").set(waiting_score)
        self.waiting.set(waiting_generate + waiting_score)
        self.running.set(running)
        self.step_budget.set(budget)

    def record_forward(self, phase: str, seconds: float, batch: int, counts: torch.Tensor, gate: torch.Tensor | None,
                       executed: float, dense: float) -> None:
        """One model forward: latency, batch size, routed tokens per (layer, operator), gates, FLOPs."""
        self.forward_latency.labels(phase, self.device).observe(seconds)
        self.batch_size.labels(phase).observe(batch)
        for layer, row in enumerate(counts.tolist(), start=1):
            for op, n in enumerate(row):
                if n:
                    self.tokens_routed.labels(str(layer), OPERATORS[op], phase).inc(n)
        if gate is not None:
            self.metarouter_gate.observe_many(gate)
        self.flops.labels("executed").inc(executed)
        self.flops.labels("dense_equivalent").inc(dense)

    def error(self, endpoint: str, reason: str) -> None:
        self.request_errors.labels(endpoint, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
