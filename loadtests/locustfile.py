"""Locust traffic for the CHIAR-Former server (the `mixed` scenario; docs/ARCHITECTURE.md, Deploy and load tests).

Weighted user classes drive /v1/generate (streamed and not, varied lengths and sampling),
/v1/perplexity (short texts and long ones scored with sliding windows) and the OpenAI-shaped
/v1/completions (generation, and echo + logprobs scoring with max_tokens=0). Prompts and texts
come from WikiText-2 test. Every response is checked for content, not only for its status.

A streamed request is timed to its last byte ("... [stream total]"). Its time to the first token
event and the gaps between token events are recorded as their own entries, with request type
"SSE" (`DERIVED`): "... [stream ttft]" and "stream ITL" (one sample per token event after the
first). They are measurements of a request, not requests, so summaries leave them out of totals.

Environment:
  CHIAR_LOADTEST_TEXT    corpus file (default data/wikitext-2/test.txt next to this package)
  CHIAR_LOADTEST_WAIT    think time "MIN,MAX" seconds between tasks (default 0.5,2)
  CHIAR_LOADTEST_SHED    "1": a 503 with Retry-After and the overloaded error body counts as a
                         success (named "... [503 shed]"), for the stress scenario
  CHIAR_API_KEY          sent as a bearer token when set
Only locust and the standard library are imported, so the official locust image runs it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, between, tag, task

HERE = Path(__file__).resolve().parent
TEXT_PATH = Path(os.environ.get("CHIAR_LOADTEST_TEXT", HERE.parent / "data" / "wikitext-2" / "test.txt"))
_wait = [float(x) for x in os.environ.get("CHIAR_LOADTEST_WAIT", "0.5,2").split(",")]
WAIT_MIN, WAIT_MAX = _wait[0], _wait[-1]
SHED_OK = os.environ.get("CHIAR_LOADTEST_SHED", "") == "1"
DERIVED = "SSE"  # request type of the entries derived from a stream's events (TTFT, ITL)
ITL_NAME = "stream ITL"
N_PROMPTS = 24
MAX_NEW_CHOICES = (4, 8, 16, 32, 64)


class CheckFailed(Exception):
    """A response that is not what the API promises."""


def expect(cond: bool, message: str) -> None:
    """Raise CheckFailed(message) unless cond."""
    if not cond:
        raise CheckFailed(message)


def load_paragraphs(path: Path) -> list[str]:
    """Non-empty, non-heading lines of the corpus."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if len(ln.split()) >= 8 and not ln.strip().startswith("=")]


class Corpus:
    """Prompts and texts sized to the served model's context, measured once per process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ready = False
        self.context = 0
        self.model_id = ""
        self.prompts: list[tuple[str, int]] = []  # (text, tokens incl. BOS)
        self.short_texts: list[str] = []
        self.long_texts: list[tuple[str, int]] = []  # (text, tokens incl. BOS), each > context

    def prepare(self, user: HttpUser) -> None:
        """Fetch the context length and tokenize candidate prompts through the server."""
        with self.lock:
            if self.ready:
                return
            rng = random.Random(1234)
            paragraphs = load_paragraphs(TEXT_PATH)
            with user.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
                body = parse_json(resp)
                cards = body.get("data") or []
                expect(bool(cards) and isinstance(cards[0].get("max_model_len"), int), "models: no max_model_len")
                self.context = cards[0]["max_model_len"]
                self.model_id = str(cards[0]["id"])
                resp.success()
            for _ in range(N_PROMPTS):
                words = rng.choice(paragraphs).split()
                start = rng.randrange(0, max(1, len(words) - 4))
                text = " ".join(words[start:start + rng.randint(3, 24)])
                n = tokenize(user, text)
                while n > self.context // 2 and len(text.split()) > 1:
                    text = " ".join(text.split()[: len(text.split()) // 2])
                    n = tokenize(user, text)
                if n <= self.context // 2:
                    self.prompts.append((text, n))
            self.short_texts = [rng.choice(paragraphs) for _ in range(N_PROMPTS)]
            for _ in range(4):
                parts: list[str] = []
                text, n = "", 0
                while n <= self.context * 2:
                    parts.append(rng.choice(paragraphs))
                    text = " ".join(parts)
                    n = tokenize(user, text)
                self.long_texts.append((text, n))
            expect(bool(self.prompts), "no prompt fits the context")
            self.ready = True


CORPUS = Corpus()


def parse_json(resp: Any) -> dict[str, Any]:
    """The response body as a JSON object, or CheckFailed."""
    try:
        body = json.loads(resp.content)
    except (ValueError, TypeError) as exc:
        raise CheckFailed(f"invalid JSON ({exc}): {resp.content[:200]!r}") from None
    expect(isinstance(body, dict), "body is not a JSON object")
    return body


def tokenize(user: HttpUser, text: str) -> int:
    """Token count of text with BOS, via POST /v1/tokenize."""
    with user.client.post("/v1/tokenize", json={"text": text}, name="/v1/tokenize", catch_response=True) as resp:
        body = parse_json(resp)
        expect(resp.status_code == 200, f"tokenize: HTTP {resp.status_code}")
        expect(body.get("count") == len(body.get("token_ids", [])), "tokenize: count != len(token_ids)")
        resp.success()
        return int(body["count"])


def check_usage(usage: dict[str, Any], prompt_tokens: int | None, max_completion: int) -> None:
    """usage = {prompt_tokens, completion_tokens, total_tokens} within bounds."""
    expect(isinstance(usage, dict), "usage missing")
    p, c, t = usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens")
    expect(all(isinstance(x, int) for x in (p, c, t)), f"usage fields not ints: {usage}")
    expect(t == p + c, f"usage total {t} != {p} + {c}")
    expect(0 <= c <= max_completion, f"completion_tokens {c} not in [0, {max_completion}]")
    if prompt_tokens is not None:
        expect(p in (prompt_tokens, prompt_tokens - 1), f"prompt_tokens {p}, tokenizer says {prompt_tokens}")


def sse_events(resp: Any, payloads: list[tuple[str, float]] | None = None) -> list[tuple[str, float]]:
    """The `data:` payloads of a server-sent-events response, in order, each with its arrival time
    (time.perf_counter() when the event's closing blank line arrived), appended to ``payloads``."""
    payloads = [] if payloads is None else payloads
    buf: list[str] = []
    # chunk_size=None: hand over each chunk as it arrives, so arrival times are the events' own
    for raw in resp.iter_lines(chunk_size=None):
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if line.startswith("data:"):
            buf.append(line[5:].lstrip())
        elif not line and buf:
            payloads.append(("\n".join(buf), time.perf_counter()))
            buf = []
    if buf:
        payloads.append(("\n".join(buf), time.perf_counter()))
    return payloads


def record(user: HttpUser, name: str, ms: float) -> None:
    """A derived measurement (not a request) as its own locust entry of type DERIVED."""
    user.environment.events.request.fire(request_type=DERIVED, name=name, response_time=ms, response_length=0,
                                         exception=None, context={})


def stream_chunks(payloads: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """Check that a stream ends with [DONE] after JSON events and no error event; the JSON events."""
    expect(len(payloads) >= 2, f"only {len(payloads)} SSE events")
    expect(payloads[-1][0] == "[DONE]", f"stream did not end with [DONE]: {payloads[-1][0][:200]!r}")
    chunks = []
    for p, _ in payloads[:-1]:
        try:
            chunks.append(json.loads(p))
        except ValueError:
            raise CheckFailed(f"SSE event is not JSON: {p[:200]!r}") from None
    expect(not any("error" in c for c in chunks), f"error event in stream: {chunks[-1]}")
    return chunks


def timed_stream(user: HttpUser, payload: dict[str, Any], label: str, check: Any) -> str:
    """POST a streamed /v1/generate, read it to the last byte and check it with check(resp, payloads).

    Entries: f"/v1/generate [{label} total]" (to the last byte; pass/fail), and for a passed stream
    f"/v1/generate [{label} ttft]" (to the first token event) and ITL_NAME (each gap between
    consecutive token events). Returns "passed", "shed" (503 + Retry-After, where allowed) or "failed".
    """
    start = time.perf_counter()
    name = f"/v1/generate [{label} total]"
    with user.client.post("/v1/generate", json=payload, name=name, stream=True, catch_response=True) as resp:
        payloads: list[tuple[str, float]] = []
        read_error = None
        if resp.status_code == 200:
            try:
                sse_events(resp, payloads)
            except Exception as exc:  # a stream cut mid-way (ChunkedEncodingError, reset, timeout)
                read_error = f"stream broken after {len(payloads)} events: {exc!r}"
        resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
        resp.request_meta["response_length"] = sum(len(p) for p, _ in payloads)

        def full_check(r: Any) -> None:
            expect(read_error is None, str(read_error))
            check(r, payloads)

        ok = handle(resp, full_check)
    if not ok:
        return "failed"
    if resp.status_code != 200:
        return "shed"
    times = [t for p, t in payloads[:-1] if json.loads(p).get("type") == "token"]
    if times:
        record(user, f"/v1/generate [{label} ttft]", (times[0] - start) * 1000)
        for before, after in itertools.pairwise(times):
            record(user, ITL_NAME, (after - before) * 1000)
    return "passed"


def handle(resp: Any, check: Any) -> bool:
    """Run check(resp) and mark the locust result; 503 + Retry-After is shed load. True if it passed."""
    try:
        if resp.status_code == 503 and SHED_OK:
            retry = resp.headers.get("Retry-After", "")
            expect(retry.isdigit() and int(retry) >= 1, f"503 without a valid Retry-After: {retry!r}")
            err = parse_json(resp).get("error") or {}
            expect(err.get("code") == "overloaded", f"503 body is not the overloaded error: {err}")
            resp.request_meta["name"] += " [503 shed]"
            resp.success()
            return True
        if resp.status_code != 200:  # not expect(): a streamed body is already read when the status is 200
            raise CheckFailed(f"HTTP {resp.status_code}: {resp.text[:300]}")
        check(resp)
        resp.success()
        return True
    except CheckFailed as exc:
        resp.failure(str(exc))
        return False


def sampling(rng: random.Random) -> dict[str, Any]:
    """One of: greedy, temperature, top-k, top-p (seeded)."""
    kind = rng.choice(("greedy", "temperature", "top_k", "top_p"))
    params: dict[str, Any] = {"seed": rng.randrange(1 << 30)}
    if kind == "greedy":
        params["temperature"] = 0.0
    elif kind == "temperature":
        params["temperature"] = rng.choice((0.7, 1.0, 1.3))
    elif kind == "top_k":
        params.update(temperature=0.9, top_k=rng.choice((5, 20, 50)))
    else:
        params.update(temperature=0.9, top_p=rng.choice((0.5, 0.9)))
    return params


class ChiarUser(HttpUser):
    """Shared setup: corpus sizing, auth header, think time."""

    abstract = True
    wait_time = between(WAIT_MIN, WAIT_MAX)

    def on_start(self) -> None:
        key = os.environ.get("CHIAR_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.rng = random.Random()
        CORPUS.prepare(self)

    def prompt_and_budget(self) -> tuple[str, int, int]:
        """A prompt, its token count and a max_new_tokens that fits the context."""
        text, n = self.rng.choice(CORPUS.prompts)
        budget = max(1, min(self.rng.choice(MAX_NEW_CHOICES), CORPUS.context - n))
        return text, n, budget


class GenerateUser(ChiarUser):
    """Native /v1/generate, streamed and not."""

    weight = 4

    @tag("generate")
    @task(2)
    def generate(self) -> None:
        prompt, n_prompt, max_new = self.prompt_and_budget()
        payload = {"prompt": prompt, "max_new_tokens": max_new, **sampling(self.rng)}

        def check(resp: Any) -> None:
            body = parse_json(resp)
            expect(isinstance(body.get("text"), str), "text missing")
            ids = body.get("token_ids")
            expect(isinstance(ids, list) and 1 <= len(ids) <= max_new, f"{len(ids or [])} tokens, max_new_tokens={max_new}")
            expect(body.get("finish_reason") in ("length", "stop", "eos"), f"finish_reason {body.get('finish_reason')}")
            if body["finish_reason"] == "length":
                expect(len(ids) == max_new, f"finish_reason length with {len(ids)} of {max_new} tokens")
            check_usage(body.get("usage"), n_prompt, max_new)
            expect(body["usage"]["completion_tokens"] == len(ids), "usage.completion_tokens != len(token_ids)")
            flops = body.get("flops") or {}
            expect(flops.get("executed", 0) > 0 and flops.get("ratio", 0) > 0, f"flops {flops}")

        with self.client.post("/v1/generate", json=payload, name="/v1/generate", catch_response=True) as resp:
            handle(resp, check)

    @tag("generate")
    @task(2)
    def generate_stream(self) -> None:
        prompt, n_prompt, max_new = self.prompt_and_budget()
        payload = {"prompt": prompt, "max_new_tokens": max_new, "stream": True, **sampling(self.rng)}

        def check(resp: Any, payloads: list[tuple[str, float]]) -> None:
            expect(resp.headers.get("content-type", "").startswith("text/event-stream"),
                   f"content-type {resp.headers.get('content-type')}")
            chunks = stream_chunks(payloads)
            streamed = [t for c in chunks if c.get("type") == "token" for t in c.get("token_ids", [])]
            done = [c for c in chunks if c.get("type") == "done"]
            expect(len(done) == 1 and chunks[-1] is done[0], f"{len(done)} done events, or not last")
            final = done[0]
            expect(1 <= len(streamed) <= max_new, f"streamed {len(streamed)} tokens, max_new_tokens={max_new}")
            expect(final.get("token_ids") == streamed, "done.token_ids != the streamed tokens")
            expect(final.get("finish_reason") in ("length", "stop", "eos"), f"finish_reason {final.get('finish_reason')}")
            check_usage(final.get("usage"), n_prompt, max_new)
            expect(final["usage"]["completion_tokens"] == len(streamed), "usage.completion_tokens != streamed tokens")

        timed_stream(self, payload, "stream", check)


class PerplexityUser(ChiarUser):
    """Native /v1/perplexity on short texts and on long ones that need sliding windows."""

    weight = 2

    def _score(self, texts: list[str], name: str, min_windows: int, expected_tokens: list[int] | None) -> None:
        def check(resp: Any) -> None:
            body = parse_json(resp)
            results = body.get("results")
            expect(isinstance(results, list) and len(results) == len(texts), "one result per text expected")
            for i, r in enumerate(results):
                expect(r.get("index") == i, "results out of order")
                ppl = r.get("perplexity")
                expect(isinstance(ppl, float | int) and math.isfinite(ppl) and ppl >= 1.0, f"perplexity {ppl}")
                expect(r.get("tokens", 0) >= 1 and r.get("windows", 0) >= min_windows,
                       f"tokens {r.get('tokens')} windows {r.get('windows')} (need >= {min_windows})")
                if expected_tokens is not None:
                    want = expected_tokens[i] - 1  # BOS is context only
                    expect(r["tokens"] == want, f"scored {r['tokens']} tokens, expected {want}")
                expect(math.isclose(math.exp(r["nll"] / r["tokens"]), ppl, rel_tol=1e-3), "perplexity != exp(nll/tokens)")
                share = (r.get("routing") or {}).get("attention_share")
                expect(share is None or 0.0 <= share <= 1.0, f"attention_share {share}")
            expect(body.get("usage", {}).get("completion_tokens") == 0, "perplexity usage.completion_tokens != 0")

        with self.client.post("/v1/perplexity", json={"text": texts if len(texts) > 1 else texts[0]},
                              name=name, catch_response=True) as resp:
            handle(resp, check)

    @tag("perplexity")
    @task(3)
    def perplexity_short(self) -> None:
        k = self.rng.randint(1, 3)
        self._score(self.rng.sample(CORPUS.short_texts, k), "/v1/perplexity", 1, None)

    @tag("perplexity")
    @task(1)
    def perplexity_long(self) -> None:
        text, n = self.rng.choice(CORPUS.long_texts)
        self._score([text], "/v1/perplexity [long]", 2, [n])


class CompletionsUser(ChiarUser):
    """OpenAI-compatible /v1/completions: generation and echo + logprobs scoring."""

    weight = 2

    @tag("completions")
    @task(2)
    def complete(self) -> None:
        prompt, n_prompt, max_new = self.prompt_and_budget()
        s = sampling(self.rng)
        payload = {"model": CORPUS.model_id, "prompt": prompt, "max_tokens": max_new, "temperature": s["temperature"],
                   "seed": s["seed"], **({"top_p": s["top_p"]} if "top_p" in s else {})}

        def check(resp: Any) -> None:
            body = parse_json(resp)
            expect(body.get("object") == "text_completion", f"object {body.get('object')}")
            expect(isinstance(body.get("id"), str) and isinstance(body.get("created"), int), "id/created missing")
            choices = body.get("choices")
            expect(isinstance(choices, list) and len(choices) == 1, "one choice expected")
            expect(isinstance(choices[0].get("text"), str), "choice text missing")
            expect(choices[0].get("finish_reason") in ("stop", "length"), f"finish_reason {choices[0].get('finish_reason')}")
            check_usage(body.get("usage"), n_prompt, max_new)
            if choices[0]["finish_reason"] == "length":
                expect(body["usage"]["completion_tokens"] == max_new, "finish_reason length but fewer tokens")

        with self.client.post("/v1/completions", json=payload, name="/v1/completions", catch_response=True) as resp:
            handle(resp, check)

    @tag("completions")
    @task(1)
    def score_echo_logprobs(self) -> None:
        prompt, n_prompt, _ = self.prompt_and_budget()
        payload = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}

        def check(resp: Any) -> None:
            body = parse_json(resp)
            choice = (body.get("choices") or [{}])[0]
            expect(choice.get("text") == prompt, "echo did not return the prompt")
            lp = choice.get("logprobs") or {}
            tokens, token_lp = lp.get("tokens"), lp.get("token_logprobs")
            expect(isinstance(tokens, list) and isinstance(token_lp, list) and len(tokens) == len(token_lp) >= 1,
                   "logprobs.tokens/token_logprobs missing or of different length")
            expect(len(lp.get("text_offset") or []) == len(tokens), "text_offset length")
            scored = [x for x in token_lp if x is not None]
            expect(len(scored) >= len(tokens) - 1, f"{len(tokens) - len(scored)} tokens without logprob")
            expect(all(isinstance(x, float | int) and x <= 1e-6 for x in scored), "a logprob > 0")
            check_usage(body.get("usage"), n_prompt, 0)

        with self.client.post("/v1/completions", json=payload, name="/v1/completions [echo logprobs]",
                              catch_response=True) as resp:
            handle(resp, check)

