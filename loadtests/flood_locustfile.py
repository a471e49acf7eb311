"""Locust traffic for the `mixed-flood` scenario: long streams, a perplexity flood and short requests at once.

Closed loop, three classes (weights 2 : 3 : 1):
- LongStreamUser: streamed /v1/generate of CHIAR_LOADTEST_STREAM_TOKENS new tokens (default 200,
  capped at what fits the context) with ignore_eos; entries "/v1/generate [long stream total]",
  "... [long stream ttft]" and "stream ITL" (client-side gaps between token events).
- PerplexityFloodUser: /v1/perplexity on long WikiText-2 texts (about CHIAR_LOADTEST_FLOOD_CHARS
  characters each, default 3000), back to back; entry "/v1/perplexity [flood]".
- ShortUser: 1-token greedy /v1/generate; entry "/v1/generate [short]".

A 503 with Retry-After counts as shed load (as in the stress scenario). At exit the flood's scored
tokens and time span and the streams begun, completed and shed are written as JSON to
$CHIAR_LOADTEST_COUNTS, for the runner's summary and checks (loadtests/flood.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import locustfile as base  # the mixed scenario's helpers; locust puts this file's directory on sys.path
from locust import between, constant, events, task

STREAM_TOKENS = int(os.environ.get("CHIAR_LOADTEST_STREAM_TOKENS", "200"))
FLOOD_CHARS = int(os.environ.get("CHIAR_LOADTEST_FLOOD_CHARS", "3000"))
COUNTS_PATH = os.environ.get("CHIAR_LOADTEST_COUNTS", "")

# Per process (one locust process runs all users of a headless run); gevent, so no locking needed.
COUNTS: dict[str, float] = {"streams_begun": 0, "streams_completed": 0, "streams_shed": 0,
                            "flood_requests": 0, "flood_scored_tokens": 0, "flood_first_start": 0.0,
                            "flood_last_end": 0.0}


def flood_texts(n: int = 16, seed: int = 77) -> list[str]:
    """n texts of about FLOOD_CHARS characters, each made of consecutive WikiText-2 paragraphs."""
    paragraphs = base.load_paragraphs(base.TEXT_PATH)
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        i = rng.randrange(len(paragraphs))
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < FLOOD_CHARS:
            parts.append(paragraphs[i % len(paragraphs)])
            i += 1
        texts.append(" ".join(parts)[:FLOOD_CHARS])
    return texts


TEXTS = flood_texts()


class LongStreamUser(base.ChiarUser):
    """Long streamed generations: the ITL that a flood must not ruin."""

    weight = 2
    wait_time = constant(0)

    @task
    def long_stream(self) -> None:
        prompt, n_prompt = self.rng.choice(base.CORPUS.prompts)
        max_new = max(1, min(STREAM_TOKENS, base.CORPUS.context - n_prompt))
        payload = {"prompt": prompt, "max_new_tokens": max_new, "stream": True, "ignore_eos": True,
                   "temperature": 0.8, "seed": self.rng.randrange(1 << 30)}

        def check(resp: Any, payloads: list[tuple[str, float]]) -> None:
            chunks = base.stream_chunks(payloads)
            streamed = [t for c in chunks if c.get("type") == "token" for t in c.get("token_ids", [])]
            done = chunks[-1]
            is_done = done.get("type") == "done" and done.get("finish_reason") == "length"
            base.expect(is_done, f"last event {str(done)[:200]}, expected done with finish_reason length")
            base.expect(len(streamed) == max_new, f"streamed {len(streamed)} of {max_new} tokens")

        COUNTS["streams_begun"] += 1  # a stream cut by the end of the run counts as begun, never completed
        outcome = base.timed_stream(self, payload, "long stream", check)
        if outcome == "shed":
            COUNTS["streams_shed"] += 1
        elif outcome == "passed":
            COUNTS["streams_completed"] += 1


class PerplexityFloodUser(base.ChiarUser):
    """Long perplexity requests back to back."""

    weight = 3
    wait_time = constant(0)

    @task
    def flood(self) -> None:
        text = self.rng.choice(TEXTS)
        start = time.time()

        def check(resp: Any) -> None:
            body = base.parse_json(resp)
            results = body.get("results") or [{}]
            tokens, ppl = results[0].get("tokens"), results[0].get("perplexity")
            base.expect(isinstance(tokens, int) and tokens >= 1, f"tokens {tokens}")
            base.expect(isinstance(ppl, float | int) and math.isfinite(ppl) and ppl >= 1.0, f"perplexity {ppl}")
            COUNTS["flood_requests"] += 1
            COUNTS["flood_scored_tokens"] += tokens
            COUNTS["flood_first_start"] = min(COUNTS["flood_first_start"] or start, start)
            COUNTS["flood_last_end"] = max(COUNTS["flood_last_end"], time.time())

        with self.client.post("/v1/perplexity", json={"text": text}, name="/v1/perplexity [flood]",
                              catch_response=True) as resp:
            base.handle(resp, check)


class ShortUser(base.ChiarUser):
    """1-token generations: must not wait behind the long ones."""

    weight = 1
    wait_time = between(0.05, 0.25)

    @task
    def short(self) -> None:
        prompt, n_prompt = self.rng.choice(base.CORPUS.prompts)
        payload = {"prompt": prompt, "max_new_tokens": 1, "temperature": 0.0}

        def check(resp: Any) -> None:
            body = base.parse_json(resp)
            ids = body.get("token_ids")
            base.expect(isinstance(ids, list) and len(ids) == 1, f"{len(ids or [])} tokens, expected 1")
            base.check_usage(body.get("usage"), n_prompt, 1)

        with self.client.post("/v1/generate", json=payload, name="/v1/generate [short]", catch_response=True) as resp:
            base.handle(resp, check)


@events.quitting.add_listener
def _write_counts(environment: Any, **_: Any) -> None:
    if COUNTS_PATH:
        path = Path(COUNTS_PATH)
        path.write_text(json.dumps(COUNTS) + "\n")  # read once locust has exited: no reader sees a part
