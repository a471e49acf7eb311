"""Every kind of bad input gets 400/413 with the error body naming the field; the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import ServerProcess, metric, scrape

LONG_PROMPT = "word " * 400  # far beyond the 128-token context

CASES = [
    # (id, path, raw body or JSON-able object, status, param)
    ("invalid-json", "/v1/generate", b'{"prompt": "x",', 400, "body"),
    ("not-an-object", "/v1/generate", b"[1, 2]", 400, "body"),
    ("non-utf8", "/v1/generate", b'{"prompt": "caf\xe9"}', 400, "body"),
    ("non-utf8-completions", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "body"),
    ("lone-surrogate", "/v1/generate", b'{"prompt": "\\ud800 x"}', 400, "prompt"),
    ("missing-prompt", "/v1/generate", {"max_new_tokens": 3}, 400, "prompt"),
    ("unknown-field", "/v1/generate", {"prompt": "x", "max_token": 3}, 400, "max_token"),
    ("wrong-type-temperature", "/v1/generate", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("wrong-type-prompt", "/v1/generate", {"prompt": 5}, 400, "prompt"),
    ("negative-temperature", "/v1/generate", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("nan-temperature", "/v1/generate", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("top-p-zero", "/v1/generate", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top-p-above-one", "/v1/generate", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("top-k-zero", "/v1/generate", {"prompt": "x", "top_k": 0}, 400, "top_k"),
    ("negative-seed", "/v1/generate", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("zero-new-tokens", "/v1/generate", {"prompt": "x", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ("new-tokens-beyond-context", "/v1/generate", {"prompt": "x", "max_new_tokens": 500}, 400, "max_new_tokens"),
    ("empty-prompt", "/v1/generate", {"prompt": ""}, 400, "prompt"),
    ("over-long-prompt", "/v1/generate", {"prompt": LONG_PROMPT, "max_new_tokens": 1}, 400, "prompt"),
    ("too-many-stops", "/v1/generate", {"prompt": "x", "stop": [str(i) for i in range(9)]}, 400, "stop"),
    ("negative-max-tokens", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("max-tokens-beyond-context", "/v1/completions", {"prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
    ("completions-top-p", "/v1/completions", {"prompt": "x", "top_p": 0.0}, 400, "top_p"),
    ("completions-temperature", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("completions-empty-prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("completions-empty-list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("completions-over-long", "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}, 400, "prompt"),
    ("too-many-prompts", "/v1/completions", {"prompt": ["x"] * 17, "max_tokens": 1}, 400, "prompt"),
    ("token-id-out-of-range", "/v1/completions", {"prompt": [1, 99999], "max_tokens": 1}, 400, "prompt"),
    ("logprobs-above-five", "/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("n-zero", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("unsupported-penalty", "/v1/completions", {"prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("perplexity-empty", "/v1/perplexity", {"text": ""}, 400, "text"),
    ("perplexity-empty-list", "/v1/perplexity", {"text": []}, 400, "text"),
    ("perplexity-too-many", "/v1/perplexity", {"text": ["a b"] * 17}, 400, "text"),
    ("perplexity-stride-zero", "/v1/perplexity", {"text": "a b", "stride": 0}, 400, "stride"),
    ("perplexity-stride-too-big", "/v1/perplexity", {"text": "a b", "stride": 129}, 400, "stride"),
    ("tokenize-wrong-type", "/v1/tokenize", {"text": ["a"]}, 400, "text"),
]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def check_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    if param:
        assert param in error["message"]
    return error


@pytest.mark.parametrize(("path", "body", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(client: httpx.Client, path: str, body: object, status: int, param: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    check_error(r, status, param)


def test_body_over_limit_is_413(client: httpx.Client) -> None:
    big = json.dumps({"prompt": "x" * 1_100_000}).encode()
    check_error(client.post("/v1/generate", content=big, headers={"content-type": "application/json"}), 413, "body")

    def chunks():  # no Content-Length: the limit still holds while streaming the body
        for _ in range(12):
            yield b" " * 100_000

    check_error(client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"}), 413, "body")


def test_errors_are_counted_and_server_keeps_serving(server: ServerProcess, client: httpx.Client) -> None:
    before = scrape(server.url)
    for _ in range(3):
        client.post("/v1/generate", json={"prompt": "x", "top_p": 7})
    after = scrape(server.url)
    assert metric(after, "chiar_request_errors_total", endpoint="/v1/generate", reason="validation") \
        - metric(before, "chiar_request_errors_total", endpoint="/v1/generate", reason="validation") == 3
    assert metric(after, "chiar_request_duration_seconds_count", endpoint="/v1/generate", status="400") \
        - metric(before, "chiar_request_duration_seconds_count", endpoint="/v1/generate", status="400") == 3
    assert client.get("/health").status_code == 200
    ok = client.post("/v1/generate", json={"prompt": "still alive", "max_new_tokens": 3})
    assert ok.status_code == 200
    assert client.get("/no/such/path").status_code == 404
    assert client.get("/v1/generate").status_code == 405
