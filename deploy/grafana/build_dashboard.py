"""Generate dashboards/chiar-former.json, the CHIAR-Former Grafana dashboard.

Run ``python deploy/grafana/build_dashboard.py`` after editing; tests/deploy checks that the
committed JSON equals this script's output and that every query names only exported metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "chiar-former.json"
DS = {"type": "prometheus", "uid": "prometheus"}
# Every series has a `model` label (a server may serve several checkpoints; "" for HTTP requests that
# reached no model): the $model variable filters, and per-model panels group by it.
SEL = 'instance=~"$instance",model=~"$model"'
RATE = "$__rate_interval"

# Share of attention among routing-layer tokens (layers L2..L-1), per model (a baseline serves every
# token with attention, so models are never mixed), see deploy/prometheus/alerts.yml.
_T = f"max by (model) (sum by (model, layer) (rate(chiar_tokens_routed_total{{{SEL}}}[{RATE}])))"
ROUTING_SHARE = (
    f'(sum by (model) (rate(chiar_tokens_routed_total{{{SEL},operator="attention"}}[{RATE}])) - {_T})'
    f" / (sum by (model) (rate(chiar_tokens_routed_total{{{SEL}}}[{RATE}])) - 2 * {_T})"
    f' and on (model) max by (model) (chiar_model_info{{{SEL},arch="chiar"}})'
)


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[dict[str, Any]]:
    """histogram_quantile targets for several quantiles, grouped by ``by`` labels."""
    group = f"{by}, le" if by else "le"
    legend_by = "".join(f" {{{{{label.strip()}}}}}" for label in by.split(",") if label.strip())
    return [
        target(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
               f"p{round(q * 100)}{legend_by}")
        for q in qs
    ]


def target(expr: str, legend: str, **extra: Any) -> dict[str, Any]:
    """One Prometheus query."""
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "range": True, **extra}


def panel(title: str, targets: list[dict[str, Any]], unit: str, kind: str = "timeseries",
          w: int = 8, h: int = 8, description: str = "", **extra: Any) -> dict[str, Any]:
    """A panel; gridPos is filled in by layout()."""
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return {"type": kind, "title": title, "description": description, "datasource": DS,
            "targets": targets, "gridPos": {"w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit, **extra.pop("defaults", {})}, "overrides": []},
            "options": extra.pop("options", {"legend": {"displayMode": "list", "placement": "bottom"}}),
            **extra}


def row(title: str) -> dict[str, Any]:
    """A row header."""
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flow panels left to right, top to bottom on Grafana's 24-column grid; assign ids."""
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["gridPos"].update(x=x, y=y)
        p["id"] = i
        x, row_h = x + w, max(row_h, h)
        if p["type"] == "row":
            x, y, row_h = 0, y + h, 0
    return panels


def share_thresholds() -> dict[str, Any]:
    """Red outside [5%, 95%]: the ChiarRoutingDrift alert's band."""
    return {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 0.05},
                                          {"color": "red", "value": 0.95}]}


def prefix_panels() -> list[dict[str, Any]]:
    """The prefix cache's row: hit rate, cached tokens, evictions and preemptions."""
    return [
        row("Prefix cache and preemption"),
        panel("Prefix-cache hit rate", [
            target(f"sum by (model) (rate(chiar_prefix_cache_hit_tokens_total{{{SEL}}}[{RATE}]))"
                   f" / sum by (model) (rate(chiar_prefix_cache_queried_tokens_total{{{SEL}}}[{RATE}]))", "{{model}}"),
        ], "percentunit", defaults={"min": 0, "max": 1},
            description="Share of new sequences' input tokens taken from the prefix cache instead of computed."),
        panel("Cached prefix tokens", [
            target(f"sum by (model) (chiar_prefix_cache_tokens{{{SEL}}})", "{{model}}"),
        ], "short"),
        panel("Evictions and preemptions", [
            target(f"sum by (model) (rate(chiar_prefix_cache_evictions_total{{{SEL}}}[{RATE}]))", "{{model}} evicted blocks/s"),
            target(f"sum by (model) (rate(chiar_preemptions_total{{{SEL}}}[{RATE}]))", "{{model}} preemptions/s"),
        ], "short", description="A preempted sequence is freed and recomputed from its tokens (from its cached prefix where it can)."),
    ]


def panels() -> list[dict[str, Any]]:
    """All panels, in display order."""
    return [
        row("Routing"),
        panel("Tokens routed per operator", [
            target(f"sum by (model, operator) (rate(chiar_tokens_routed_total{{{SEL}}}[{RATE}]))", "{{model}} {{operator}}"),
        ], "short", description="Token-layer decisions per second, all layers and phases.",
            options={"legend": {"displayMode": "list", "placement": "bottom"}, "stacking": {"mode": "normal"}}),
        panel("Tokens routed per layer and operator", [
            target(f"sum by (layer, operator) (rate(chiar_tokens_routed_total{{{SEL}}}[{RATE}]))",
                   "L{{layer}} {{operator}}"),
        ], "short", description="L1 is the MetaRouter (identity/dct), the last layer is always attention."),
        panel("Attention share per layer", [
            target(f'sum by (model, layer) (rate(chiar_tokens_routed_total{{{SEL},operator="attention"}}[{RATE}]))'
                   f" / sum by (model, layer) (rate(chiar_tokens_routed_total{{{SEL}}}[{RATE}]))", "{{model}} L{{layer}}"),
        ], "percentunit", defaults={"min": 0, "max": 1}),
        panel("Attention share, routing layers", [target(ROUTING_SHARE, "{{model}}")], "percentunit",
              kind="stat", w=6, description="Alert ChiarRoutingDrift fires outside 5%..95% for 10 minutes.",
              defaults={"min": 0, "max": 1, "thresholds": share_thresholds()},
              options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"}),
        panel("FLOPs saved (1 - executed / dense)", [
            target(f'1 - sum by (model) (rate(chiar_flops_total{{{SEL},kind="executed"}}[{RATE}]))'
                   f' / sum by (model) (rate(chiar_flops_total{{{SEL},kind="dense_equivalent"}}[{RATE}]))', "{{model}}"),
        ], "percentunit", w=6, defaults={"min": 0, "max": 1}),
        panel("MetaRouter gate distribution", [
            target(f"sum by (le) (increase(chiar_metarouter_gate_bucket{{{SEL}}}[{RATE}]))", "{{le}}",
                   format="heatmap"),
        ], "short", kind="heatmap", w=12, description="Layer-1 gate g per token; g >= 0.5 applies DCT mixing.",
            options={"calculate": False, "yAxis": {"unit": "short"}, "color": {"scheme": "Oranges"}}),
        row("Latency"),
        panel("Device forward latency by phase", quantiles("chiar_forward_latency_seconds", "phase, device",
                                                           (0.5, 0.99)), "s"),
        panel("Time to first token", quantiles("chiar_time_to_first_token_seconds", "model"), "s"),
        panel("Inter-token latency", quantiles("chiar_inter_token_latency_seconds", "model"), "s"),
        panel("Request duration p99 by endpoint", quantiles("chiar_request_duration_seconds", "model, endpoint", (0.99,)),
              "s", w=12),
        panel("Queue wait", quantiles("chiar_queue_wait_seconds", "model", (0.5, 0.99)), "s", w=12),
        row("Throughput and queue"),
        panel("Token throughput", [
            target(f"sum by (model) (rate(chiar_generation_tokens_total{{{SEL}}}[{RATE}]))", "{{model}} generated tokens/s"),
            target(f"sum by (model) (rate(chiar_prompt_tokens_total{{{SEL}}}[{RATE}]))", "{{model}} prompt tokens/s"),
        ], "short"),
        panel("Requests per second by endpoint and status", [
            target(f"sum by (endpoint, status) (rate(chiar_request_duration_seconds_count{{{SEL}}}[{RATE}]))",
                   "{{endpoint}} {{status}}"),
        ], "reqps"),
        panel("Queue per class", [
            target(f"sum by (model, class) (chiar_queue_length{{{SEL}}})", "{{model}} waiting {{class}}"),
            target(f"sum by (model) (chiar_requests_running{{{SEL}}})", "{{model}} running"),
        ], "short"),
        panel("Step composition (tokens per step)", [
            target(f"sum by (kind) (rate(chiar_step_tokens_sum{{{SEL}}}[{RATE}]))"
                   f" / sum by (kind) (rate(chiar_step_tokens_count{{{SEL}}}[{RATE}]))", "{{kind}}"),
            target(f"avg(chiar_step_budget_tokens{{{SEL}}})", "chunk budget"),
        ], "short"),
        panel("Step time", quantiles("chiar_step_seconds", "model", (0.5, 0.95, 0.99)), "s"),
        panel("KV cache", [
            target(f"sum by (model, kind) (chiar_kv_cache_bytes{{{SEL}}})", "{{model}} {{kind}}"),
            target(f"sum by (model) (chiar_prefix_cache_bytes{{{SEL}}})", "{{model}} cached prefixes"),
        ], "bytes", description="used = running sequences + cached prefixes (evicted on demand); it never exceeds the limit."),
        panel("Batch size by phase", [
            target(f"sum by (phase) (rate(chiar_batch_size_sum{{{SEL}}}[{RATE}]))"
                   f" / sum by (phase) (rate(chiar_batch_size_count{{{SEL}}}[{RATE}]))", "mean {{phase}}"),
            *quantiles("chiar_batch_size", "phase", (0.95,)),
        ], "short"),
        panel("Errors by reason", [
            target(f"sum by (endpoint, reason) (rate(chiar_request_errors_total{{{SEL}}}[{RATE}]))",
                   "{{endpoint}} {{reason}}"),
        ], "reqps"),
        panel("Model", [
            target(f"chiar_model_info{{{SEL}}}", "", format="table", instant=True, range=False),
        ], "none", kind="table", options={"showHeader": True}),
        *prefix_panels(),
    ]


def variable(label: str, title: str) -> dict[str, Any]:
    """A multi-value template variable over chiar_model_info's `label` values, All by default (All also
    matches the model="" series of requests that reached no model)."""
    return {
        "name": label, "label": title, "type": "query", "datasource": DS,
        "query": {"query": f"label_values(chiar_model_info, {label})", "refId": label},
        "definition": f"label_values(chiar_model_info, {label})",
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def dashboard() -> dict[str, Any]:
    """The whole dashboard document."""
    return {
        "uid": "chiar-former",
        "title": "CHIAR-Former serving",
        "description": "Routing, latency, throughput and errors of the CHIAR-Former inference server.",
        "tags": ["chiar", "inference"],
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "browser",
        "templating": {"list": [variable("instance", "Instance"), variable("model", "Model")]},
        "annotations": {"list": []},
        "panels": layout(panels()),
    }


def render() -> str:
    """The dashboard as the committed JSON text."""
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
