"""/metrics: exactly the names, types and labels of docs/ARCHITECTURE.md (Metrics), and counters moving by the expected amounts."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ServerProcess, metric, scrape

EXPECTED = {  # name -> (type, label names); every series carries the served model's id
    "chiar_tokens_routed": ("counter", {"model", "layer", "operator", "phase"}),
    "chiar_metarouter_gate": ("histogram", {"model"}),
    "chiar_forward_latency_seconds": ("histogram", {"model", "phase", "device"}),
    "chiar_request_duration_seconds": ("histogram", {"model", "endpoint", "status"}),
    "chiar_time_to_first_token_seconds": ("histogram", {"model"}),
    "chiar_inter_token_latency_seconds": ("histogram", {"model"}),
    "chiar_queue_wait_seconds": ("histogram", {"model"}),
    "chiar_requests_running": ("gauge", {"model"}),
    "chiar_requests_waiting": ("gauge", {"model"}),
    "chiar_batch_size": ("histogram", {"model", "phase"}),
    "chiar_prompt_tokens": ("counter", {"model"}),
    "chiar_generation_tokens": ("counter", {"model"}),
    "chiar_flops": ("counter", {"model", "kind"}),
    "chiar_request_errors": ("counter", {"model", "endpoint", "reason"}),
    "chiar_model_info": ("gauge", {"model", "arch", "params", "checkpoint"}),
    "chiar_queue_length": ("gauge", {"model", "class"}),
    "chiar_step_tokens": ("histogram", {"model", "kind"}),
    "chiar_step_seconds": ("histogram", {"model"}),
    "chiar_step_budget_tokens": ("gauge", {"model"}),
    "chiar_steps": ("counter", {"model", "generation", "scoring"}),
    "chiar_step_over_budget": ("counter", {"model"}),
    "chiar_step_score_tokens_max": ("gauge", {"model"}),
    "chiar_kv_cache_bytes": ("gauge", {"model", "kind"}),
    "chiar_prefix_cache_queried_tokens": ("counter", {"model"}),
    "chiar_prefix_cache_hit_tokens": ("counter", {"model"}),
    "chiar_prefix_cache_evictions": ("counter", {"model"}),
    "chiar_prefix_cache_bytes": ("gauge", {"model"}),
    "chiar_prefix_cache_tokens": ("gauge", {"model"}),
    "chiar_preemptions": ("counter", {"model"}),
}


def test_metric_names_types_labels(server: ServerProcess) -> None:
    httpx.post(server.url + "/v1/generate", json={"prompt": "x", "top_p": 9})  # one error series
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == set(EXPECTED)
    for name, (kind, labels) in EXPECTED.items():
        family = families[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
    for sample in families["chiar_tokens_routed"].samples:
        assert sample.labels["operator"] in ("attention", "dct", "identity", "rbf")
        assert sample.labels["phase"] in ("prefill", "decode")
    assert {s.labels["kind"] for s in families["chiar_flops"].samples} == {"executed", "dense_equivalent"}
    assert {s.labels["device"] for s in families["chiar_forward_latency_seconds"].samples} == {"cpu"}
    info = families["chiar_model_info"].samples[0]
    assert info.value == 1 and info.labels["arch"] == "chiar" and info.labels["checkpoint"] == "chiar-tiny"
    assert info.labels["model"] == "chiar-tiny"
    assert {s.labels["model"] for s in families["chiar_tokens_routed"].samples} == {"chiar-tiny"}
    # a request that never reached a model (invalid body) is counted with model=""
    errors = families["chiar_request_errors"].samples  # other tests on the shared server add their own series
    assert {s.labels["model"] for s in errors} <= {"", "chiar-tiny"}
    assert any(s.labels["model"] == "" and s.labels["endpoint"] == "/v1/generate" and s.labels["reason"] == "validation"
               and s.value >= 1 for s in errors), errors
    assert int(info.labels["params"]) > 0


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def test_counters_move_by_expected_amounts(server: ServerProcess) -> None:
    n_layers = 4
    before = scrape(server.url)
    r = httpx.post(server.url + "/v1/generate",
                   json={"prompt": "A counted history of the city", "max_new_tokens": 10, "temperature": 0, "ignore_eos": True}, timeout=60)
    gen = r.json()
    mid = scrape(server.url)
    prompt, new = gen["usage"]["prompt_tokens"], gen["usage"]["completion_tokens"]
    assert new == 10
    # a prompt no other test sends: nothing comes from the prefix cache, so every token runs through the model
    assert gen["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert delta(mid, before, "chiar_prefix_cache_queried_tokens_total") == prompt
    assert delta(mid, before, "chiar_prefix_cache_hit_tokens_total") == 0
    assert delta(mid, before, "chiar_generation_tokens_total") == 10
    assert delta(mid, before, "chiar_prompt_tokens_total") == prompt
    for layer in range(1, n_layers + 1):
        for phase, expected in (("prefill", prompt), ("decode", new - 1)):
            routed = sum(delta(mid, before, "chiar_tokens_routed_total", layer=str(layer), operator=op, phase=phase)
                         for op in ("attention", "dct", "identity", "rbf"))
            assert routed == expected, (layer, phase)
    last = str(n_layers)
    assert delta(mid, before, "chiar_tokens_routed_total", layer=last, operator="attention", phase="prefill") == prompt
    assert delta(mid, before, "chiar_tokens_routed_total", layer="1", operator="attention", phase="prefill") == 0
    assert delta(mid, before, "chiar_flops_total", kind="executed") == pytest.approx(gen["flops"]["executed"], rel=1e-9)
    assert delta(mid, before, "chiar_flops_total", kind="dense_equivalent") == pytest.approx(gen["flops"]["dense"], rel=1e-9)
    assert delta(mid, before, "chiar_forward_latency_seconds_count", phase="prefill", device="cpu") == 1
    assert delta(mid, before, "chiar_forward_latency_seconds_count", phase="decode", device="cpu") == new - 1
    assert delta(mid, before, "chiar_batch_size_count", phase="decode") == new - 1
    assert delta(mid, before, "chiar_time_to_first_token_seconds_count") == 1
    assert delta(mid, before, "chiar_inter_token_latency_seconds_count") == new - 1
    assert delta(mid, before, "chiar_queue_wait_seconds_count") == 1
    assert delta(mid, before, "chiar_metarouter_gate_count") == prompt + new - 1
    assert delta(mid, before, "chiar_request_duration_seconds_count", endpoint="/v1/generate", status="200") == 1
    assert metric(mid, "chiar_requests_running") == 0 and metric(mid, "chiar_requests_waiting") == 0

    text = "Counters , counted : Robert Boulter is an English film actor ."  # its first 8 tokens are this test's own
    answer = httpx.post(server.url + "/v1/perplexity", json={"text": text}, timeout=60).json()
    ppl = answer["results"][0]
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    after = scrape(server.url)
    assert delta(after, mid, "chiar_prompt_tokens_total") == ppl["tokens"]
    assert delta(after, mid, "chiar_generation_tokens_total") == 0
    for layer in range(1, n_layers + 1):
        routed = sum(delta(after, mid, "chiar_tokens_routed_total", layer=str(layer), operator=op, phase="prefill")
                     for op in ("attention", "dct", "identity", "rbf"))
        assert routed == ppl["tokens"]
        assert [delta(after, mid, "chiar_tokens_routed_total", layer=str(layer), operator=op, phase="prefill")
                for op in ("identity", "dct", "rbf", "attention")] == ppl["routing"]["per_layer"][layer - 1]
    assert delta(after, mid, "chiar_forward_latency_seconds_count", phase="prefill", device="cpu") == 1
    assert delta(after, mid, "chiar_request_duration_seconds_count", endpoint="/v1/perplexity", status="200") == 1
