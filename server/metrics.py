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
NO_MODEL = ""  # the model label of HTTP requests that never reached a model (health, bad input, unknown model)
GATE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class BulkCounts:
    """One label value's buckets of a BulkHistogram, observed a tensor at a time.

    `observe_many` only keeps the tensor (the engine calls it every step); the buckets are counted
    when the histogram is read (`flush`, at scrape time) or once MAX_PENDING tensors wait."""

    MAX_PENDING = 1024

    def __init__(self, bounds: list[float]) -> None:
        self._edges = torch.tensor(bounds, dtype=torch.float64)
        self.counts = [0] * (len(bounds) + 1)  # last = +Inf overflow
        self.sum = 0.0
        self.lock = threading.Lock()
        self._pending: list[torch.Tensor] = []

    def observe_many(self, values: torch.Tensor) -> None:
        with self.lock:
            self._pending.append(values.detach().reshape(-1))
            if len(self._pending) < self.MAX_PENDING:
                return
        self.flush()

    def flush(self) -> None:
        with self.lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        values = torch.cat([v.to("cpu", torch.float64) for v in pending])
        values = values[~torch.isnan(values)]
        if values.numel() == 0:
            return
        index = torch.bucketize(values, self._edges)  # first bucket with value <= bound
        counts = torch.bincount(index, minlength=len(self.counts)).tolist()
        with self.lock:
            for i, c in enumerate(counts):
                self.counts[i] += c
            self.sum += float(values.sum())


class BulkHistogram:
    """A histogram with one label, observed a tensor at a time (one MetaRouter gate per token)."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float], label: str) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = [float(b) for b in buckets]
        self._children: dict[str, BulkCounts] = {}
        self._lock = threading.Lock()

    def labels(self, value: str) -> BulkCounts:
        with self._lock:
            return self._children.setdefault(value, BulkCounts(self.bounds))

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            children = list(self._children.items())
        for value, child in children:
            child.flush()
            with child.lock:
                cumulative, running = [], 0
                for bound, count in zip([*self.bounds, float("inf")], child.counts):
                    running += count
                    cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
                total = child.sum
            family.add_metric([value], cumulative, total)
        return [family]

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.label])]


class Metrics:
    """All chiar_* metrics in their own registry (served by GET /metrics). Every series carries a `model`
    label (the served model id; NO_MODEL for HTTP requests that never reached a model); `for_model` gives
    one engine its view with that label bound."""

    def __init__(self, device: str) -> None:
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.device = device
        r = self.registry
        m = "model"
        self.tokens_routed = Counter("chiar_tokens_routed_total", "Tokens processed per layer and operator (hard gating).",
                                     [m, "layer", "operator", "phase"], registry=r)
        self.metarouter_gate = BulkHistogram("chiar_metarouter_gate", "MetaRouter gate g per token (layer 1).", GATE_BUCKETS, m)
        r.register(self.metarouter_gate)
        self.forward_latency = Histogram("chiar_forward_latency_seconds", "Model forward time (CUDA events on GPU, wall clock on CPU).",
                                         [m, "phase", "device"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_duration = Histogram("chiar_request_duration_seconds", "HTTP request duration.", [m, "endpoint", "status"],
                                          buckets=REQUEST_BUCKETS, registry=r)
        self.ttft = Histogram("chiar_time_to_first_token_seconds", "Arrival to first generated token.", [m], buckets=REQUEST_BUCKETS,
                              registry=r)
        self.inter_token = Histogram("chiar_inter_token_latency_seconds", "Time between consecutive generated tokens of a request.",
                                     [m], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("chiar_queue_wait_seconds", "Arrival to admission into the running batch.", [m],
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.running = Gauge("chiar_requests_running", "Sequences being decoded or scored.", [m], registry=r)
        self.waiting = Gauge("chiar_requests_waiting", "Sequences waiting for admission.", [m], registry=r)
        self.batch_size = Histogram("chiar_batch_size", "Sequences per forward.", [m, "phase"], buckets=BATCH_BUCKETS, registry=r)
        self.prompt_tokens = Counter("chiar_prompt_tokens_total", "Prompt/scored input tokens processed (BOS included).", [m], registry=r)
        self.generation_tokens = Counter("chiar_generation_tokens_total", "Tokens generated.", [m], registry=r)
        self.flops = Counter("chiar_flops_total", "FLOPs executed and what the dense baseline would spend.", [m, "kind"], registry=r)
        self.request_errors = Counter("chiar_request_errors_total", "Failed requests.", [m, "endpoint", "reason"], registry=r)
        self.queue_length = Gauge("chiar_queue_length", "Requests waiting for admission, per class.", [m, "class"], registry=r)
        self.step_tokens = Histogram("chiar_step_tokens", "Tokens one engine step processed, per kind (decode, prefill, score).",
                                     [m, "kind"], buckets=STEP_TOKEN_BUCKETS, registry=r)
        self.step_seconds = Histogram("chiar_step_seconds", "Engine step time (model calls and output processing).", [m],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.step_budget = Gauge("chiar_step_budget_tokens", "Prefill + scoring tokens the next step may spend.", [m], registry=r)
        self.steps = Counter("chiar_steps_total", "Engine steps, by whether generation ran and whether scoring ran.",
                             [m, "generation", "scoring"], registry=r)
        self.step_over_budget = Counter("chiar_step_over_budget_total", "Steps whose prefill + scoring tokens exceeded the budget.",
                                        [m], registry=r)
        self.max_step_score_tokens = Gauge("chiar_step_score_tokens_max", "Most scoring tokens one step processed while "
                                           "sequences were decoding (since start).", [m], registry=r)
        self.kv_cache = Gauge("chiar_kv_cache_bytes", "KV-cache bytes in use (running sequences and cached prefixes), and the budget.",
                              [m, "kind"], registry=r)
        self.prefix_queried = Counter("chiar_prefix_cache_queried_tokens", "Input tokens of new sequences looked up in the prefix cache.",
                                      [m], registry=r)
        self.prefix_hits = Counter("chiar_prefix_cache_hit_tokens", "Looked-up tokens taken from the prefix cache instead of computed.",
                                   [m], registry=r)
        self.prefix_evictions = Counter("chiar_prefix_cache_evictions", "Cached blocks of 8 tokens evicted (least recently used first).",
                                        [m], registry=r)
        self.prefix_bytes = Gauge("chiar_prefix_cache_bytes", "KV-cache bytes of cached prefixes (running sequences may share them).",
                                  [m], registry=r)
        self.prefix_tokens = Gauge("chiar_prefix_cache_tokens", "Tokens of cached prefixes.", [m], registry=r)
        self.preemptions = Counter("chiar_preemptions", "Sequences preempted (freed and requeued for recompute) to keep the KV budget.",
                                   [m], registry=r)
        self.model_info = Gauge("chiar_model_info", "Served model (value 1).", [m, "arch", "params", "checkpoint"], registry=r)

    def for_model(self, name: str, n_layers: int) -> ModelMetrics:
        """The series of one served model (created at zero so dashboards see them before traffic)."""
        return ModelMetrics(self, name, n_layers)

    def error(self, endpoint: str, reason: str, model: str = NO_MODEL) -> None:
        self.request_errors.labels(model, endpoint, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """One engine's view of Metrics: the same series with `model` bound to its id."""

    def __init__(self, metrics: Metrics, name: str, n_layers: int) -> None:
        self.name = name
        self.device = metrics.device
        self.recording = True  # off during the engine's warm-up: its steps are not traffic
        self.ttft = metrics.ttft.labels(name)
        self.inter_token = metrics.inter_token.labels(name)
        self.queue_wait = metrics.queue_wait.labels(name)
        self.prompt_tokens = metrics.prompt_tokens.labels(name)
        self.generation_tokens = metrics.generation_tokens.labels(name)
        self.running = metrics.running.labels(name)
        self.waiting = metrics.waiting.labels(name)
        self.step_seconds = metrics.step_seconds.labels(name)
        self.step_budget = metrics.step_budget.labels(name)
        self.step_over_budget = metrics.step_over_budget.labels(name)
        self.max_step_score_tokens = metrics.max_step_score_tokens.labels(name)
        self.metarouter_gate = metrics.metarouter_gate.labels(name)
        self.prefix_queried = metrics.prefix_queried.labels(name)
        self.prefix_hits = metrics.prefix_hits.labels(name)
        self.prefix_evictions = metrics.prefix_evictions.labels(name)
        self.prefix_bytes = metrics.prefix_bytes.labels(name)
        self.prefix_tokens = metrics.prefix_tokens.labels(name)
        self.preemptions = metrics.preemptions.labels(name)
        self._prefix_totals = (0, 0, 0, 0)  # queried, hits, evictions, preemptions as last recorded
        self._m = metrics
        # every labelled child bound once: the engine records every step, a labels() lookup each time costs
        self._routed = {(phase, layer, op): metrics.tokens_routed.labels(name, str(layer + 1), label, phase)
                        for layer in range(n_layers) for op, label in enumerate(OPERATORS) for phase in PHASES}
        self._latency = {phase: metrics.forward_latency.labels(name, phase, self.device) for phase in PHASES}
        self._batch = {phase: metrics.batch_size.labels(name, phase) for phase in PHASES}
        self._flops = {kind: metrics.flops.labels(name, kind) for kind in ("executed", "dense_equivalent")}
        self._queue = {cls: metrics.queue_length.labels(name, cls) for cls in ("generate", "score")}
        self._step_tokens = {kind: metrics.step_tokens.labels(name, kind) for kind in ("decode", "prefill", "score")}
        self._kv = {kind: metrics.kv_cache.labels(name, kind) for kind in ("used", "limit")}
        self._steps = {(a, b): metrics.steps.labels(name, a, b) for a in ("true", "false") for b in ("true", "false")}
        self._max_score = 0

    def info(self, arch: str, params: int) -> None:
        self._m.model_info.labels(self.name, arch, str(params), self.name).set(1)

    def record_step(self, decode: int, prefill: int, score: int, budget: int, seconds: float, kv_used: int, kv_limit: int) -> None:
        """One engine step's composition and time."""
        self._step_tokens["decode"].observe(decode)
        self._step_tokens["prefill"].observe(prefill)
        self._step_tokens["score"].observe(score)
        self.step_seconds.observe(seconds)
        self._steps[str(decode > 0 or prefill > 0).lower(), str(score > 0).lower()].inc()
        if prefill + score > budget:
            self.step_over_budget.inc()
        if decode and score > self._max_score:
            self._max_score = score
            self.max_step_score_tokens.set(score)
        self._kv["used"].set(kv_used)
        self._kv["limit"].set(kv_limit)

    def record_prefix(self, queried: int, hits: int, evictions: int, cached_bytes: int, cached_tokens: int, preemptions: int) -> None:
        """The prefix cache's and the preemptions' running totals (counters move by what changed)."""
        totals = (queried, hits, evictions, preemptions)
        for counter, now, before in zip((self.prefix_queried, self.prefix_hits, self.prefix_evictions, self.preemptions), totals,
                                        self._prefix_totals):
            if now > before:
                counter.inc(now - before)
        self._prefix_totals = totals
        self.prefix_bytes.set(cached_bytes)
        self.prefix_tokens.set(cached_tokens)

    def update_queues(self, waiting_generate: int, waiting_score: int, running: int, budget: int) -> None:
        self._queue["generate"].set(waiting_generate)
        self._queue["score"].set(waiting_score)
        self.waiting.set(waiting_generate + waiting_score)
        self.running.set(running)
        self.step_budget.set(budget)

    def record_forward(self, phase: str, seconds: float, batch: int, counts: list[list[list[int]]], gate: torch.Tensor | None,
                       executed: float, dense: float) -> None:
        """One model forward: latency and batch size under `phase`; routed tokens per (layer, operator)
        per token phase (counts[0]: decode tokens, counts[1]: prompt and scoring tokens); gates; FLOPs."""
        self._latency[phase].observe(seconds)
        self._batch[phase].observe(batch)
        for token_phase, table in zip(("decode", "prefill"), counts):
            for layer, row in enumerate(table):
                for op, n in enumerate(row):
                    if n:
                        self._routed[token_phase, layer, op].inc(n)
        if gate is not None:
            self.metarouter_gate.observe_many(gate)
        self._flops["executed"].inc(executed)
        self._flops["dense_equivalent"].inc(dense)

    def error(self, endpoint: str, reason: str) -> None:
        self._m.error(endpoint, reason, self.name)
