"""The OpenAPI document matches the server: structural checks, and a bounded schemathesis run (--checks all)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
# Operations whose request schemas live in server/openai_schemas.py, plus the read-only ones.
# The native routes and /v1/completions use server/schemas.py; see docs/SERVER.md "OpenAPI".
FUZZED = r"^/.*$"  # every route


@pytest.fixture(scope="module")
def keyed_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "keyed.log", env={"CHIAR_API_KEY": "sekret"}).start()
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
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def run_schemathesis(url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "--checks", "all",
           "--max-examples", "12", "--seed", "7", "--workers", "1", "--phases", "examples,coverage,fuzzing",
           "--request-timeout", "60", "--include-path-regex", FUZZED, "--suppress-health-check", "all",
           "--report-dir", str(tmp_path / "report"), *extra]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.server.schemathesis_hooks", "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS.parents[2]), os.environ.get("PYTHONPATH")]))}
    # cwd: schemathesis keeps a .schemathesis/ folder in the working directory
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=500, cwd=tmp_path)


@pytest.mark.slow
def test_schemathesis_checks_all(server: ServerProcess, tmp_path: Path) -> None:
    proc = run_schemathesis(server.url, tmp_path)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert "Tested: 14" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
def test_schemathesis_with_api_key(keyed_server: ServerProcess, tmp_path: Path) -> None:
    proc = run_schemathesis(keyed_server.url, tmp_path, "--header", "Authorization: Bearer sekret", "--max-examples", "4")
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
