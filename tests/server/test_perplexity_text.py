"""POST /v1/perplexity/text: a document larger than the JSON body limit, scored like /v1/perplexity."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.perplexity_text import TEXT_BODY_LIMIT
from tests.server.conftest import ServerProcess
from tests.support import WIKI

JSON_LIMIT = 32768  # small, so a document over it stays quick to score on the tiny model


@pytest.fixture(scope="module")
def small_limit_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "text.log",
                         env={"CHIAR_MAX_BODY_BYTES": str(JSON_LIMIT)}).start()
    yield proc
    proc.stop()


def test_text_body_over_the_json_limit_is_scored_like_json(small_limit_server: ServerProcess, server: ServerProcess) -> None:
    text = (WIKI / "test.txt").read_text(encoding="utf-8")[:100_000]
    assert len(text.encode()) > 3 * JSON_LIMIT
    url = small_limit_server.url
    assert httpx.post(url + "/v1/perplexity", json={"text": text}, timeout=60).status_code == 413
    r = httpx.post(url + "/v1/perplexity/text?stride=64", content=text.encode(), headers={"Content-Type": "text/plain"},
                   timeout=300)
    assert r.status_code == 200, r.text
    got = r.json()
    # the shared server (1 MiB JSON limit) scores the same text sent as JSON
    want = httpx.post(server.url + "/v1/perplexity", json={"text": text, "stride": 64}, timeout=300).json()
    assert got["stride"] == want["stride"] == 64
    for key in ("tokens", "bytes", "words", "windows"):
        assert got["results"][0][key] == want["results"][0][key]
    assert got["results"][0]["nll"] == pytest.approx(want["results"][0]["nll"], rel=1e-6)
    assert got["results"][0]["bits_per_byte"] == pytest.approx(want["results"][0]["bits_per_byte"], rel=1e-6)


def test_text_route_errors(small_limit_server: ServerProcess) -> None:
    url = small_limit_server.url + "/v1/perplexity/text"
    cases = [
        (b"", {}, 400, "text"),
        (b"\xff\xfe bad", {}, 400, "body"),
        (b"some text", {"stride": "0"}, 400, "stride"),
        (b"some text", {"stride": "100000"}, 400, "stride"),
        (b"some text", {"stride": "1.5"}, 400, "stride"),
        (b"some text", {"return_logprobs": "1"}, 400, "return_logprobs"),
    ]
    for content, params, status, param in cases:
        r = httpx.post(url, content=content, params=params, headers={"Content-Type": "text/plain"}, timeout=60)
        assert r.status_code == status, (content, params, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"].startswith(param), r.text
    too_big = httpx.post(url, content=b"a" * (TEXT_BODY_LIMIT + 1), headers={"Content-Type": "text/plain"}, timeout=60)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
