"""One sampling-parameter policy (issue 21): every generating route accepts and refuses the same
temperature, top_p, top_k and seed values, and the OpenAPI document declares them once.

Before issue 21, /v1/chat/completions took temperatures up to 100 and tiny temperatures and top_p
that /v1/generate and /v1/completions refused.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

ROUTES = {
    "/v1/generate": {"prompt": "x", "max_new_tokens": 1},
    "/v1/completions": {"prompt": "x", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
}
# (field, value, accepted): OpenAI's ranges, less what float32 sampling cannot turn into a distribution
CASES = [
    ("temperature", 0, True), ("temperature", 1e-45, False), ("temperature", 1e-5, False), ("temperature", 1e-4, True),
    ("temperature", 1.0, True), ("temperature", 2.0, True), ("temperature", 2.5, False), ("temperature", 50, False),
    ("temperature", -0.5, False), ("temperature", None, True),
    ("top_p", 0, False), ("top_p", 1e-45, False), ("top_p", 1e-30, True), ("top_p", 0.5, True), ("top_p", 1.0, True),
    ("top_p", 1.5, False), ("top_p", None, True),
    ("top_k", 0, False), ("top_k", 1, True), ("top_k", 40, True), ("top_k", None, True),
    ("seed", -1, False), ("seed", 0, True), ("seed", 2**53 - 1, True), ("seed", 2**53, False), ("seed", None, True),
]
FIELDS = {"temperature": "Temperature", "top_p": "TopP", "top_k": "TopK", "seed": "Seed"}
REQUESTS = ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest")


@pytest.mark.parametrize(("field", "value", "accepted"), CASES, ids=[f"{f}={v}" for f, v, _ in CASES])
def test_every_route_accepts_and_refuses_the_same_sampling_values(client: httpx.Client, field: str, value: Any,
                                                                   accepted: bool) -> None:
    for path, body in ROUTES.items():
        r = client.post(path, json={**body, field: value})
        assert r.status_code == (200 if accepted else 400), (path, r.text)
        if not accepted:
            assert r.json()["error"]["param"] == field, (path, r.text)


def test_the_document_declares_the_sampling_fields_once(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for field, component in FIELDS.items():
        assert component in schemas
        for request in REQUESTS:
            prop = schemas[request]["properties"][field]
            refs = [option.get("$ref") for option in prop.get("anyOf", prop.get("allOf", []))]
            assert f"#/components/schemas/{component}" in refs, (request, field, prop)
