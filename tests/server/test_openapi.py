"""The OpenAPI document matches the server: structural checks, and a bounded schemathesis run (--checks all)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.openapi import LINKS
from tests.server.conftest import ServerProcess

KEY = {"Authorization": "Bearer sekret"}
MAX_NEW = 4  # the bounded generation length of the fuzzed servers (--max-new-tokens), declared in their document
BOUNDED = {"CHIAR_MAX_NEW_TOKENS": str(MAX_NEW), "CHIAR_MAX_BATCH_SIZE": "8"}


@pytest.fixture(scope="module")
def bounded_server(long_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The 1024-context tiny model with --max-new-tokens 4: every schema-valid case is small enough to answer quickly."""
    proc = ServerProcess(long_checkpoint, tmp_path_factory.mktemp("logs") / "bounded.log", env=BOUNDED).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keyed_server(long_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(long_checkpoint, tmp_path_factory.mktemp("logs") / "keyed.log",
                         env={**BOUNDED, "CHIAR_API_KEY": "sekret"}).start()
    yield proc
    proc.stop()


def test_document_says_400_error_bodies_sse_and_text_metrics(server: ServerProcess) -> None:
    doc = httpx.get(server.url + "/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "securitySchemes" not in doc["components"]  # no key configured
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")) and path != "/ready":
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
            if method == "post":
                assert {"400", "413"} <= set(op["responses"]), path
    assert {"503", "504"} <= set(doc["paths"]["/v1/chat/completions"]["post"]["responses"])
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions"):
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert "text/event-stream" in content and "application/json" in content
    assert "ChatCompletionChunk" in doc["components"]["schemas"]
    assert httpx.get(server.url + "/metrics").headers["content-type"].startswith("text/plain")


def test_bearer_scheme_when_a_key_is_configured(keyed_server: ServerProcess) -> None:
    doc = httpx.get(keyed_server.url + "/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "the server's API key (CHIAR_API_KEY)"}
    assert doc["paths"]["/v1/chat/completions"]["post"]["security"] == [{"bearerAuth": []}]
    assert doc["paths"]["/v1/chat/completions"]["post"]["responses"]["401"]
    assert doc["paths"]["/health"]["get"]["security"] == []
    r = httpx.post(keyed_server.url + "/tokenize", json={"prompt": "x"})
    assert httpx.post(keyed_server.url + "/tokenize", json={"prompt": "x"}, headers=KEY).status_code == 200
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_document_declares_the_limits(bounded_server: ServerProcess) -> None:
    schemas = httpx.get(bounded_server.url + "/openapi.json").json()["components"]["schemas"]
    generate, completion, chat = (schemas[n]["properties"] for n in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"))
    assert generate["max_new_tokens"]["maximum"] == MAX_NEW == generate["max_new_tokens"]["default"]
    assert [o.get("maximum") for o in completion["max_tokens"]["anyOf"]] == [MAX_NEW, None]
    for field in ("max_completion_tokens", "max_tokens"):
        assert [o.get("maximum") for o in chat[field]["anyOf"]] == [MAX_NEW, None]
    lists = [o for o in completion["prompt"]["anyOf"] if o["type"] == "array" and o["items"]["type"] != "integer"]
    assert [o["maxItems"] for o in lists] == [16, 16]  # --max-prompts
    assert [o.get("maxItems") for o in schemas["PerplexityRequest"]["properties"]["text"]["anyOf"]] == [None, 16]
    assert [o.get("maxItems") for o in generate["stop"]["anyOf"]] == [None, 8, None]
    # the server enforces what the document says, naming the field
    for path, body in (("/v1/generate", {"prompt": "x", "max_new_tokens": MAX_NEW + 1}),
                       ("/v1/completions", {"prompt": "x", "max_tokens": MAX_NEW + 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1,
                                                 "max_tokens": MAX_NEW + 1})):
        r = httpx.post(bounded_server.url + path, json=body, timeout=30)
        field = next(k for k, v in body.items() if v == MAX_NEW + 1)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert f"must be at most {MAX_NEW}" in r.json()["error"]["message"]
    r = httpx.post(bounded_server.url + "/v1/generate", json={"prompt": "The history of"}, timeout=30)  # the default is lowered
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= MAX_NEW


def run_schemathesis(url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """schemathesis as a user runs it: every route, every check, every phase (stateful included), no hooks."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "--checks", "all",
           "--max-examples", "12", "--seed", "7", "--workers", "1", "--request-timeout", "60",
           "--suppress-health-check", "all", "--report-dir", str(tmp_path / "report"), *extra]
    env = {**os.environ, "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path)}
    # cwd: schemathesis keeps a .schemathesis/ folder in the working directory
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=500, cwd=tmp_path)


def check_run(proc: subprocess.CompletedProcess, url: str) -> None:
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    operations = sum(len(ops) for ops in httpx.get(url + "/openapi.json", headers=KEY).json()["paths"].values())
    assert f"Tested: {operations}" in proc.stdout, proc.stdout[-3000:]
    for phase in ("Coverage", "Fuzzing", "Stateful"):  # (Examples: the document has none, so that phase is skipped)
        assert f"✅ {phase}" in proc.stdout, proc.stdout[-3000:]
    links = sum(len(links) for links in LINKS.values())  # the stateful phase follows every link of the document
    assert re.search(rf"API Links: +{links} covered / {links} selected / {links} total", proc.stdout), proc.stdout[-3000:]


@pytest.mark.slow
def test_schemathesis_checks_all(bounded_server: ServerProcess, tmp_path: Path) -> None:
    check_run(run_schemathesis(bounded_server.url, tmp_path), bounded_server.url)


@pytest.mark.slow
def test_schemathesis_with_api_key(keyed_server: ServerProcess, tmp_path: Path) -> None:
    check_run(run_schemathesis(keyed_server.url, tmp_path, "--header", f"Authorization: {KEY['Authorization']}"), keyed_server.url)
