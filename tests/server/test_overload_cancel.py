"""Overload (503 + Retry-After, never a hang) and cancellation freeing the slot, on a 1-slot server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess, metric, scrape


@pytest.fixture(scope="module")
def small(long_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(long_checkpoint, tmp_path_factory.mktemp("logs") / "small.log",
                         env={"CHIAR_MAX_BATCH_SIZE": "1", "CHIAR_QUEUE_SIZE": "1"}).start()
    yield proc
    proc.stop()


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if metric(samples, "chiar_requests_running") == 0 and metric(samples, "chiar_requests_waiting") == 0:
            return samples
        assert time.monotonic() < deadline, "slot was not freed"
        time.sleep(0.05)


LONG = {"prompt": "A long story", "max_new_tokens": 1000, "ignore_eos": True}


def test_stream_disconnect_frees_the_slot(small: ServerProcess) -> None:
    before = wait_idle(small.url)
    with httpx.Client(timeout=30) as client, client.stream("POST", small.url + "/v1/generate", json={**LONG, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token, then hang up
    after = wait_idle(small.url)
    assert metric(after, "chiar_request_errors_total", endpoint="/v1/generate", reason="cancelled") \
        - metric(before, "chiar_request_errors_total", endpoint="/v1/generate", reason="cancelled") == 1
    generated = metric(after, "chiar_generation_tokens_total") - metric(before, "chiar_generation_tokens_total")
    assert 1 <= generated < 1000  # stopped early
    start = time.monotonic()
    ok = httpx.post(small.url + "/v1/generate", json={"prompt": "next", "max_new_tokens": 4}, timeout=30)
    assert ok.status_code == 200 and time.monotonic() - start < 5


def test_non_stream_disconnect_frees_the_slot(small: ServerProcess) -> None:
    before = wait_idle(small.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small.url + "/v1/generate", json=LONG, timeout=httpx.Timeout(30, read=0.3))
    after = wait_idle(small.url)
    assert metric(after, "chiar_request_errors_total", endpoint="/v1/generate", reason="cancelled") \
        - metric(before, "chiar_request_errors_total", endpoint="/v1/generate", reason="cancelled") == 1
    assert metric(after, "chiar_generation_tokens_total") - metric(before, "chiar_generation_tokens_total") < 1000


def test_full_queue_answers_503_with_retry_after(small: ServerProcess) -> None:
    wait_idle(small.url)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"prompt": "busy", "max_new_tokens": 150, "ignore_eos": True}
            return await asyncio.gather(*(client.post(small.url + "/v1/generate", json=body) for _ in range(12)))

    start = time.monotonic()
    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert error["code"] == "overloaded" and error["type"] == "overloaded_error"
    assert time.monotonic() - start < 60
    samples = wait_idle(small.url)
    assert metric(samples, "chiar_request_errors_total", endpoint="/v1/generate", reason="overloaded") == statuses.count(503)
