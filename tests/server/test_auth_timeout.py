"""API key (bearer, constant-time compare) and request timeouts, on a server started with both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess, metric, scrape

KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def strict(long_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """1024-token context, so a 1000-token generation outlives the 0.05 s timeout on any machine."""
    log = tmp_path_factory.mktemp("logs") / "strict.log"
    proc = ServerProcess(long_checkpoint, log, env={"CHIAR_API_KEY": KEY}, args=["--request-timeout", "0.05"]).start()
    yield proc
    proc.stop()


PROTECTED = [("POST", "/v1/generate", {"prompt": "x", "max_new_tokens": 2}), ("POST", "/v1/perplexity", {"text": "x y"}),
             ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}), ("POST", "/v1/tokenize", {"text": "x"}),
             ("GET", "/v1/models", None)]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p[1] for p in PROTECTED])
def test_protected_endpoints_need_the_key(strict: ServerProcess, method: str, path: str, body: dict | None) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.request(method, strict.url + path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_public_endpoints_and_valid_key(strict: ServerProcess) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(strict.url + path).status_code == 200
    good = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(strict.url + "/v1/models", headers=good).status_code == 200
    assert httpx.post(strict.url + "/v1/tokenize", json={"text": "x"}, headers=good).status_code == 200
    assert openai.OpenAI(base_url=strict.url + "/v1", api_key=KEY).models.list().data[0].id == "chiar-long"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_request_timeout_cancels(strict: ServerProcess) -> None:
    good = {"Authorization": f"Bearer {KEY}"}
    before = scrape(strict.url)
    r = httpx.post(strict.url + "/v1/generate", json={"prompt": "x", "max_new_tokens": 1000, "ignore_eos": True}, headers=good, timeout=30)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "timeout"
    with httpx.stream("POST", strict.url + "/v1/generate", headers=good, timeout=30,
                      json={"prompt": "x", "max_new_tokens": 1000, "ignore_eos": True, "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert '"code":"timeout"' in lines[-1]
    after = scrape(strict.url)
    assert metric(after, "chiar_request_errors_total", endpoint="/v1/generate", reason="timeout") \
        - metric(before, "chiar_request_errors_total", endpoint="/v1/generate", reason="timeout") == 2
    assert metric(after, "chiar_generation_tokens_total") - metric(before, "chiar_generation_tokens_total") < 2000
    assert metric(after, "chiar_requests_running") == 0
