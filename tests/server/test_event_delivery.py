"""Event delivery: a non-streamed request's jobs post only their final event (the event loop is not woken
every step for tokens nobody reads); a streamed one posts every token. Both give the same text."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from server.engine.requests import Event, Job, Outbox
from tests.support import in_process_app, wait_ready


def test_only_streams_get_token_events(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    posted: Counter[tuple[bool, str]] = Counter()
    put = Outbox.put

    def counting(self: Outbox, job: Job, event: Event) -> None:
        posted[(job.final_only, type(event).__name__)] += 1
        put(self, job, event)

    monkeypatch.setattr(Outbox, "put", counting)
    app, _ = in_process_app(tiny_checkpoint)
    body = {"model": "chiar-tiny", "prompt": "The river ran past the old town", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "n": 2}
    with TestClient(app) as client:
        wait_ready(client)
        plain = client.post("/v1/completions", json=body)
        assert plain.status_code == 200, plain.text
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            lines = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    streamed_text = ["", ""]
    for chunk in map(json.loads, lines):
        for choice in chunk["choices"]:
            streamed_text[choice["index"]] += choice["text"]
    assert [c["text"] for c in plain.json()["choices"]] == streamed_text
    assert posted[(True, "DoneEvent")] == 2 and posted[(True, "TokenEvent")] == 0  # non-streamed: one event per job
    assert posted[(False, "TokenEvent")] == 12 and posted[(False, "DoneEvent")] == 2
