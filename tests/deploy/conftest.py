"""Fixtures for the deploy checks: a live server process on loopback and its /metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.server_process import ServerProcess, http_get


def post(url: str, payload: dict) -> dict:
    """POST JSON, return the decoded JSON answer (raises on HTTP errors)."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def live_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real `python -m server` process on 127.0.0.1 serving the tiny checkpoint."""
    log = tmp_path_factory.mktemp("live-server") / "server.log"
    with ServerProcess(tiny_checkpoint, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def live_metrics(live_server: ServerProcess) -> str:
    """/metrics text after one generation, one stream, one perplexity request and one invalid
    request (so every histogram and counter has samples)."""
    post(live_server.url + "/v1/generate", {"prompt": "The tower is", "max_new_tokens": 6, "temperature": 0.0})
    post(live_server.url + "/v1/perplexity", {"text": "The tower is 324 metres tall ."})
    req = urllib.request.Request(live_server.url + "/v1/generate",
                                 data=json.dumps({"prompt": "It was", "max_new_tokens": 4, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.read().rstrip().endswith(b"data: [DONE]")
    bad = urllib.request.Request(live_server.url + "/v1/generate", data=b'{"prompt": "x", "max_new_tokens": 0}',
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=30)
    assert err.value.code == 400
    status, body = http_get(live_server.url + "/metrics")
    assert status == 200
    return body.decode()
