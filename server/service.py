"""What the routes share: one Service per served model (settings, engine, tokenizer, metrics), the
ServedModels that picks one by a request's `model`, the one job factory (`Jobs`), job events, SSE framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from tokenizers import Tokenizer

from server.engine.requests import DoneEvent, ErrorEvent, Event, GenerateJob, GenParams, Job, ScoreJob, Unavailable
from server.errors import APIError, error_body, invalid, overloaded
from server.id_offsets import IdOffsets
from server.routes import endpoint_label
from server.settings import Settings
from server.textstream import TokenStrings

if TYPE_CHECKING:
    from server.engine.engine import Engine
from server.token_limits import INLINE_CHARS, POOL, Encoded, LimitedEncoder, RunTooLong, TooManyTokens


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class Jobs:
    """The engine jobs of one request, made here and nowhere else: they share one event queue (on this
    event loop) and the request timeout, and are numbered in the order they are made."""

    def __init__(self, svc: Service) -> None:
        self.timeout = svc.settings.request_timeout
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.items: list[Job] = []

    def __len__(self) -> int:
        return len(self.items)

    def _add(self, job: Job) -> Any:
        self.items.append(job)
        return job

    def generate(self, ids: list[int], params: GenParams) -> GenerateJob:
        return self._add(GenerateJob(ids, params, queue=self.queue, loop=self.loop, index=len(self.items),
                                     timeout=self.timeout))

    def score(self, seqs: list[list[int]], window: int, stride: int, top_n: int | None, routing: bool = False) -> ScoreJob:
        return self._add(ScoreJob(seqs, window, stride, top_n, routing=routing, queue=self.queue, loop=self.loop,
                                  index=len(self.items), timeout=self.timeout))


class Service:
    """What the routes share about one served model: settings, engine, tokenizer, its metrics."""

    def __init__(self, settings: Settings, engine: Engine, tokenizer: Tokenizer, checkpoint: Path) -> None:
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.metrics = engine.metrics
        self.config = engine.config
        self.context = engine.config.max_seq_len
        # Advertised context: the server's BOS takes one position, so what clients send + generate must fit in one less.
        self.max_model_len = self.context - 1
        self.bos = engine.config.bos_token_id
        # the most new tokens one choice may ask for: the context less BOS and one prompt token, or --max-new-tokens
        self.max_new_tokens = min(self.max_model_len - 1, settings.max_new_tokens or self.max_model_len)
        self.name = engine.name
        self.created = int(time.time())
        self.tokenizer.encode_special_tokens = True  # "<eos>" typed by a user is text, not a control token
        self.encoder = LimitedEncoder(self.tokenizer, self.bos)
        self.id_offsets = IdOffsets(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))
        self.token_str = TokenStrings(tokenizer)  # id -> printable piece (logprobs, routing, tokenize)
        self.cut_points = engine.model.routing_cut_points()  # served weights never change

    # ---------------------------------------------------------------- tokens
    def prompt_ids_now(self, texts: list[str], param: str = "prompt", offsets: bool = False) -> list[Encoded]:
        """BOS + ids of each prompt, on this thread; a prompt over the context is refused before it is tokenized whole
        (400 context_length_exceeded naming `param`)."""
        def refuse(where: str, at_least: int) -> str:
            return f"{where}is at least {at_least + 1} tokens (BOS included); the context holds {self.context}"

        return limited(self.encoder, texts, self.context - 1, per_text=True, offsets=offsets, param=param, refuse=refuse,
                       code="context_length_exceeded")

    async def prompt_ids(self, texts: list[str], param: str = "prompt", offsets: bool = False) -> list[Encoded]:
        """`prompt_ids_now`, off the event loop for long texts."""
        return await off_loop(sum(map(len, texts)), lambda: self.prompt_ids_now(texts, param, offsets))

    def scored_ids_now(self, texts: list[str], param: str, verb: str = "score", encoder: LimitedEncoder | None = None) -> list[Encoded]:
        """BOS + ids of texts that together may have at most --max-score-tokens ids (400 too_many_tokens beyond),
        on this thread; `encoder` replaces the service's (the /tokenize route's parses special-token strings)."""
        limit = self.settings.max_score_tokens

        def refuse(where: str, at_least: int) -> str:
            return f"is at least {at_least} tokens; one request may {verb} at most {limit} (the server's --max-score-tokens)"

        return limited(encoder or self.encoder, texts, limit, per_text=False, offsets=False, param=param, refuse=refuse,
                       code="too_many_tokens")

    async def scored_ids(self, texts: list[str], param: str, verb: str = "score", encoder: LimitedEncoder | None = None) -> list[Encoded]:
        """`scored_ids_now`, off the event loop for long texts."""
        return await off_loop(sum(map(len, texts)), lambda: self.scored_ids_now(texts, param, verb, encoder))

    def new_tokens(self, asked: int | None, default: int, param: str, prompt: list[int]) -> int:
        """A request's new-token count: `asked` up to max_new_tokens (400 naming `param` beyond), else `default`
        capped there and at what the context leaves after `prompt` (a default never makes a request fail)."""
        if asked is None:
            return max(1, min(default, self.max_new_tokens, self.context - len(prompt)))
        if asked > self.max_new_tokens:
            why = "the server's --max-new-tokens" if self.settings.max_new_tokens == self.max_new_tokens else \
                f"the context of {self.context} tokens less BOS and one prompt token"
            raise invalid(param, f"must be at most {self.max_new_tokens} for model {self.name} ({why}), got {asked}",
                          code="context_length_exceeded")
        return asked

    def check_length(self, ids: list[int], new_tokens: int, new_param: str, prompt_param: str = "prompt") -> None:
        if len(ids) >= self.context + (1 if new_tokens == 0 else 0):
            raise invalid(prompt_param, f"is {len(ids)} tokens (BOS included); the context holds {self.context}"
                          + ("" if new_tokens == 0 else " including at least one new token"), code="context_length_exceeded")
        if len(ids) + new_tokens > self.context:
            raise invalid(new_param, f"prompt ({len(ids)} tokens) + {new_param} ({new_tokens}) exceeds the context of "
                          f"{self.context} tokens; at most {self.context - len(ids)}", code="context_length_exceeded")
        if new_tokens:
            self.check_kv(len(ids), new_tokens, new_param, prompt_param)

    def check_kv(self, n_prompt: int, new_tokens: int, new_param: str, prompt_param: str) -> None:
        """A generation whose cache could never fit the KV budget, even alone, is refused (400), not queued forever."""
        need, budget, share = self.engine.kv_needed(n_prompt + new_tokens)
        if need <= budget:
            return
        prompt_alone, _, _ = self.engine.kv_needed(n_prompt)
        param = prompt_param if prompt_alone > budget else new_param
        raise kv_exceeded(param, f"prompt ({n_prompt} tokens) + {new_param} ({new_tokens}) needs", need, budget, share)

    def check_score_kv(self, seqs: list[list[int]], param: str) -> None:
        """A scoring request whose longest window could never fit the KV budget is refused (400) like a generation."""
        longest = max((min(len(ids) - 1, self.context) for ids in seqs), default=0)
        need, budget, share = self.engine.kv_needed(longest)
        if longest and need > budget:
            raise kv_exceeded(param, f"has a window of {longest} tokens that needs", need, budget, share)

    # ---------------------------------------------------------------- jobs
    def submit(self, jobs: Jobs, stream: bool) -> None:
        """Hand the jobs to the engine; a request that is not streamed gets only each job's final event."""
        for job in jobs.items:
            job.final_only = not stream
        try:
            self.engine.submit(jobs.items)
        except Unavailable as exc:
            raise overloaded(exc.retry_after, str(exc)) from None

    async def events(self, jobs: Jobs, request: Request | None = None) -> AsyncIterator[Event]:
        """Events of all jobs until each is done; polls for disconnects when `request` is given."""
        queue, remaining = jobs.queue, len(jobs)
        loop = asyncio.get_running_loop()
        hard_deadline = loop.time() + self.settings.request_timeout + 10.0
        next_check = loop.time() + 0.25
        try:
            while remaining:
                if not queue.empty():  # a step's events arrive together: no timer for those already here
                    event = queue.get_nowait()
                else:
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=0.25)
                    except TimeoutError:
                        event = None
                if loop.time() >= next_check:
                    next_check = loop.time() + 0.25
                    if request is not None and await request.is_disconnected():
                        raise ClientGone()
                    if loop.time() > hard_deadline:
                        self.engine.cancel(jobs.items, "timeout")
                        raise timeout_error()
                if event is None:
                    continue
                if isinstance(event, ErrorEvent):
                    raise engine_error(event)
                if isinstance(event, DoneEvent):
                    remaining -= 1
                yield event
        finally:
            if remaining:
                self.engine.cancel(jobs.items, "cancelled")

    async def collect(self, jobs: Jobs, request: Request) -> list[Any]:
        """The result of each job, in job order (GenerationResult or ScoreResult)."""
        results: list[Any] = [None] * len(jobs)
        try:
            async for event in self.events(jobs, request):
                if isinstance(event, DoneEvent):
                    results[event.index] = event.result
        except ClientGone:
            raise APIError(499, "client disconnected", code="client_closed_request", reason="cancelled") from None
        return results

    def error_for_stream(self, path: str, exc: APIError) -> bytes:
        self.metrics.error(endpoint_label(path), exc.reason)
        return sse(error_body(exc.message, exc.type, exc.param, exc.code))

    def sse_response(self, events: AsyncIterator[bytes], request: Request) -> StreamingResponse:
        """The SSE answer of every streaming route: `events`, then `data: [DONE]`. An APIError mid-stream
        becomes one error event (the status line is already sent); a client hang-up counts as cancelled."""

        async def stream() -> AsyncIterator[bytes]:
            try:
                async with contextlib.aclosing(events) as body:  # closed now, not at garbage collection
                    async for part in body:
                        yield part
                yield sse("[DONE]")
            except APIError as exc:
                yield self.error_for_stream(request.url.path, exc)
            except (asyncio.CancelledError, GeneratorExit):  # the client hung up mid-stream
                self.metrics.error(endpoint_label(request.url.path), "cancelled")
                raise

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class ServedModels:
    """The served models in --checkpoint order; the first is the default for requests without `model`."""

    def __init__(self, services: list[Service]) -> None:
        if not services:
            raise ValueError("at least one model")
        self.by_name = {svc.name: svc for svc in services}
        if len(self.by_name) != len(services):
            raise ValueError(f"duplicate model ids: {[svc.name for svc in services]}")
        self.default = services[0]

    def __iter__(self) -> Iterator[Service]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, model: str | None, request: Request | None = None) -> Service:
        """The model a request names (None: the default), or 404 model_not_found naming the served ids.
        Records the model on `request` for the request metrics' `model` label."""
        svc = self.default if model is None else self.by_name.get(model)
        if svc is None:
            served = ", ".join(f"'{name}'" for name in self.by_name)
            raise APIError(404, f"model: '{model}' is not served here (available: {served})", param="model",
                           code="model_not_found")
        if request is not None:
            request.state.model = svc.name
        return svc


def limited(encoder: LimitedEncoder, texts: list[str], limit: int, *, per_text: bool, offsets: bool, param: str,
            refuse: Callable[[str, int], str], code: str) -> list[Encoded]:
    """`encoder.encode` with its refusals as 400s naming `param`: refuse(where, at least this many tokens) words a
    count over `limit`; a text that cannot be cut into pieces gets run_too_long."""
    try:
        return encoder.encode(texts, limit, per_text=per_text, offsets=offsets)
    except TooManyTokens as exc:
        where = f"{param}[{exc.index}] " if per_text and len(texts) > 1 else ""
        raise invalid(param, refuse(where, exc.at_least), code=code) from None
    except RunTooLong as exc:
        where = f"{param}[{exc.index}] " if len(texts) > 1 else ""
        raise invalid(param, f"{where}has more than {exc.max_run} characters from character {exc.start} without whitespace "
                             "after a word; long texts are tokenized in pieces cut at such whitespace", code="run_too_long") from None


async def off_loop(size: int, fn: Callable[[], Any]) -> Any:
    """fn() on the tokenizer pool when its work (`size` characters or tokens) is large, else at once (below
    INLINE_CHARS it takes about a millisecond)."""
    if size < INLINE_CHARS:
        return fn()
    return await asyncio.get_running_loop().run_in_executor(POOL, fn)


def timeout_error() -> APIError:
    return APIError(504, "request timed out", code="timeout", type_="timeout_error", reason="timeout")


def kv_exceeded(param: str, what: str, need: int, budget: int, share: float) -> APIError:
    """400 kv_cache_exceeded: `what` (a sequence) needs more KV cache than the whole budget holds."""
    return invalid(param, f"{what} about {need / 2**20:.2f} MiB of KV cache at the measured attention share {share:.2f}; "
                   f"the server's KV-cache budget (--kv-cache-mb) is {budget / 2**20:.2f} MiB", code="kv_cache_exceeded")


def engine_error(event: ErrorEvent) -> APIError:
    if event.reason == "timeout":
        return timeout_error()
    if event.reason == "cancelled":
        return APIError(499, "request cancelled", code="cancelled", reason="cancelled")
    if event.reason == "shutdown":
        return APIError(503, event.message, code="shutdown", type_="server_error", reason="shutdown")
    if event.reason == "kv_cache_exceeded":  # it outgrew the whole pool alone (routing above the measured share)
        return APIError(400, event.message, code="kv_cache_exceeded", reason="validation")
    return APIError(500, event.message, code="internal_error", type_="server_error", reason="internal")


def sse(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()

