"""FastAPI routes: native generate/perplexity/tokenize, OpenAI completions/models, health, metrics, playground."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from tokenizers import Tokenizer

from server.body_timeout import BodyTimeout
from server.engine import (
    DoneEvent,
    Engine,
    ErrorEvent,
    Event,
    GenerateJob,
    GenerationResult,
    GenParams,
    Job,
    LogprobEntry,
    PromptEvent,
    ScoreJob,
    ScoreResult,
    TokenEvent,
    Unavailable,
)
from server.errors import APIError, error_body, install_handlers, invalid, overloaded
from server.metrics import OPERATORS, Metrics
from server.middleware import BearerAuth, BodyLimit, RequestMetrics, endpoint_label
from server.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Flops,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    PerplexityRequest,
    PerplexityResponse,
    PerplexityResult,
    Routing,
    RoutingCounts,
    Timing,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    Usage,
)
from server.settings import Settings

STATIC = Path(__file__).parent / "static"
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid input (the error names the field)"},
    401: {"description": "missing or wrong API key"},
    413: {"description": "body too large"},
    503: {"description": "queue full or not ready (see Retry-After)"},
}


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class Service:
    """What the routes share: settings, engine, tokenizer, metrics."""

    def __init__(self, settings: Settings, engine: Engine, tokenizer: Tokenizer, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.config = engine.config
        self.context = engine.config.max_seq_len
        self.bos = engine.config.bos_token_id
        self.name = settings.served_model_name
        self.created = int(time.time())
        self.tokenizer.encode_special_tokens = True  # "<eos>" typed by a user is text, not a control token

    # ---------------------------------------------------------------- tokens
    def _encode(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [([self.bos, *e.ids], [(0, 0), *e.offsets]) for e in encodings]

    async def encode(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        if sum(len(t) for t in texts) < 4096:
            return self._encode(texts)
        return await asyncio.to_thread(self._encode, texts)

    def check_length(self, ids: list[int], new_tokens: int, new_param: str, prompt_param: str = "prompt") -> None:
        if len(ids) >= self.context + (1 if new_tokens == 0 else 0):
            raise invalid(prompt_param, f"is {len(ids)} tokens (BOS included); the context holds {self.context}"
                          + ("" if new_tokens == 0 else " including at least one new token"), code="context_length_exceeded")
        if len(ids) + new_tokens > self.context:
            raise invalid(new_param, f"prompt ({len(ids)} tokens) + {new_param} ({new_tokens}) exceeds the context of "
                          f"{self.context} tokens; at most {self.context - len(ids)}", code="context_length_exceeded")

    # ---------------------------------------------------------------- jobs
    def submit(self, jobs: list[Job]) -> None:
        try:
            self.engine.submit(jobs)
        except Unavailable as exc:
            raise overloaded(exc.retry_after, str(exc)) from None

    async def events(self, jobs: list[Job], queue: asyncio.Queue, request: Request | None) -> AsyncIterator[Event]:
        """Events of all jobs until each is done; polls for disconnects when `request` is given."""
        remaining = len(jobs)
        loop = asyncio.get_running_loop()
        hard_deadline = loop.time() + self.settings.request_timeout + 10.0
        next_check = loop.time() + 0.25
        try:
            while remaining:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.25)
                except TimeoutError:
                    event = None
                if loop.time() >= next_check:
                    next_check = loop.time() + 0.25
                    if request is not None and await request.is_disconnected():
                        raise ClientGone()
                    if loop.time() > hard_deadline:
                        self.engine.cancel(jobs, "timeout")
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
                self.engine.cancel(jobs, "cancelled")

    async def collect(self, jobs: list[Job], queue: asyncio.Queue, request: Request) -> list[Any]:
        """The result of each job, in job order (GenerationResult or ScoreResult)."""
        position = {job.index: k for k, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        try:
            async for event in self.events(jobs, queue, request):
                if isinstance(event, DoneEvent):
                    results[position[event.index]] = event.result
        except ClientGone:
            raise APIError(499, "client disconnected", code="client_closed_request", reason="cancelled") from None
        return results  # type: ignore[return-value]

    def error_for_stream(self, path: str, exc: APIError) -> bytes:
        self.metrics.error(endpoint_label(path), exc.reason)
        return sse(error_body(exc.message, exc.type, exc.param, exc.code))


def timeout_error() -> APIError:
    return APIError(504, "request timed out", code="timeout", type_="timeout_error", reason="timeout")


def engine_error(event: ErrorEvent) -> APIError:
    if event.reason == "timeout":
        return timeout_error()
    if event.reason == "cancelled":
        return APIError(499, "request cancelled", code="cancelled", reason="cancelled")
    if event.reason == "shutdown":
        return APIError(503, event.message, code="shutdown", type_="server_error", reason="shutdown")
    return APIError(500, event.message, code="internal_error", type_="server_error", reason="internal")


def sse(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def safe_exp(x: float) -> float | None:
    try:
        return math.exp(x)
    except OverflowError:
        return None


# -------------------------------------------------------------------- app factory
def create_app(settings: Settings, engine: Engine, tokenizer: Tokenizer, metrics: Metrics) -> FastAPI:
    svc = Service(settings, engine, tokenizer, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, settings.drain_timeout)

    app = FastAPI(title="CHIAR-Former inference server", version="0.1.0", lifespan=lifespan,
                  description="Hard-gated CHIAR-Former: native generate/perplexity, OpenAI-compatible completions.")
    app.state.service = svc
    install_handlers(app, lambda request, err: metrics.error(endpoint_label(request.url.path), err.reason))

    # ---------------------------------------------------------------- health
    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: {"description": "loading or warming up"}})
    async def ready() -> JSONResponse:
        status = engine.status()
        if status.ready:
            return JSONResponse({"status": "ready", "model": svc.name})
        state = "failed" if status.failed else ("draining" if status.draining else "loading")
        return JSONResponse({"status": state}, status_code=503, headers={"Retry-After": str(status.retry_after)})

    @app.get("/metrics", tags=["ops"])
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- tokenize, models
    @app.post("/v1/tokenize", response_model=TokenizeResponse, responses=ERRORS, tags=["native"])
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ids, _ = (await svc.encode([body.text]))[0]
        if not body.add_bos:
            ids = ids[1:]
        return TokenizeResponse(token_ids=ids, tokens=[engine.token_str(i) for i in ids], count=len(ids), max_context=svc.context)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=svc.name, created=svc.created, max_model_len=svc.context, arch=svc.config.arch)])

    # ---------------------------------------------------------------- generate
    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS, tags=["native"])
    async def generate(body: GenerateRequest, request: Request) -> Any:
        ids, _ = (await svc.encode([body.prompt]))[0]
        svc.check_length(ids, body.max_new_tokens, "max_new_tokens")
        params = GenParams(max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_k=body.top_k,
                           top_p=body.top_p, seed=body.seed, stop=body.stop, ignore_eos=body.ignore_eos,
                           return_routing=body.return_routing)
        queue: asyncio.Queue = asyncio.Queue()
        job = GenerateJob(ids, params, queue=queue, loop=asyncio.get_running_loop(), index=0, timeout=settings.request_timeout)
        svc.submit([job])
        rid = "gen-" + job.id

        def final(result: GenerationResult) -> GenerateResponse:
            return generate_response(svc, rid, ids, result)

        if not body.stream:
            return final((await svc.collect([job], queue, request))[0])

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for event in svc.events([job], queue, None):
                    if isinstance(event, TokenEvent):
                        yield sse({"type": "token", "id": rid, "text": event.text, "token_ids": event.token_ids})
                    elif isinstance(event, DoneEvent):
                        yield sse({"type": "done", **final(event.result).model_dump()})
                yield sse("[DONE]")
            except APIError as exc:
                yield svc.error_for_stream(request.url.path, exc)
            except (asyncio.CancelledError, GeneratorExit):  # the client hung up mid-stream
                metrics.error(endpoint_label(request.url.path), "cancelled")
                raise

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---------------------------------------------------------------- perplexity
    @app.post("/v1/perplexity", response_model=PerplexityResponse, responses=ERRORS, tags=["native"])
    async def perplexity(body: PerplexityRequest, request: Request) -> PerplexityResponse:
        texts = [body.text] if isinstance(body.text, str) else body.text
        if len(texts) > settings.max_prompts:
            raise invalid("text", f"at most {settings.max_prompts} texts per request, got {len(texts)}", code="too_many_prompts")
        stride = body.stride if body.stride is not None else max(1, svc.context // 2)
        if stride > svc.context:
            raise invalid("stride", f"must be <= the context ({svc.context} tokens), got {stride}")
        encoded = await svc.encode(texts)
        seqs = [ids for ids, _ in encoded]
        queue: asyncio.Queue = asyncio.Queue()
        job = ScoreJob(seqs, svc.context, stride, None, queue=queue, loop=asyncio.get_running_loop(), index=0,
                       timeout=settings.request_timeout)
        svc.submit([job])
        result: ScoreResult = (await svc.collect([job], queue, request))[0]
        results = []
        for i, text in enumerate(texts):
            lps = result.logprobs[i]
            nll = -sum(lps)
            n = len(lps)
            words = len(text.split())
            n_bytes = len(text.encode("utf-8"))
            counts = result.counts[i]
            routing_layers = [row for layer, row in enumerate(counts) if 0 < layer < len(counts) - 1]
            routed = sum(sum(row) for row in routing_layers)
            results.append(PerplexityResult(
                index=i, tokens=n, words=words, bytes=n_bytes, nll=nll, mean_nll=nll / n,
                perplexity=safe_exp(nll / n) or float("nan"),
                word_perplexity=safe_exp(nll / words) if words else None,
                bits_per_byte=nll / (math.log(2) * n_bytes) if n_bytes else None,
                windows=result.windows[i],
                logprobs=[TokenLogprob(token=engine.token_str(t), id=t, logprob=lp) for t, lp in zip(seqs[i][1:], lps)]
                if body.return_logprobs else None,
                routing=RoutingCounts(operator_names=list(OPERATORS), per_layer=counts,
                                      attention_share=(sum(row[3] for row in routing_layers) / routed) if routed else None),
            ))
        total = sum(len(s) - 1 for s in seqs)
        return PerplexityResponse(model=svc.name, window=svc.context, stride=stride, results=results,
                                  usage=Usage(prompt_tokens=total, completion_tokens=0, total_tokens=total),
                                  timing=Timing(queue_seconds=result.queue_seconds, time_to_first_token_seconds=None,
                                                total_seconds=result.total_seconds))

    # ---------------------------------------------------------------- OpenAI completions
    @app.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=False, responses=ERRORS, tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await openai_completions(svc, body, request)

    # ---------------------------------------------------------------- playground
    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # middleware: added last = outermost
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_error=metrics.error)
    app.add_middleware(BodyTimeout, seconds=settings.body_timeout)
    app.add_middleware(BearerAuth, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def generate_response(svc: Service, rid: str, prompt_ids: list[int], result: GenerationResult) -> GenerateResponse:
    routing = None
    if result.routing is not None:
        trace = result.routing
        processed = (prompt_ids + result.token_ids)[: len(trace.operator)]
        routing = Routing(operator_names=list(OPERATORS), tokens=[svc.engine.token_str(t) for t in processed], token_ids=processed,
                          prompt_tokens=len(prompt_ids), operator=trace.operator, entropy=trace.entropy, gate=trace.gate)
    dense = result.flops_dense
    return GenerateResponse(
        id=rid, model=svc.name, text=result.text, token_ids=result.token_ids, finish_reason=str(result.finish_reason),
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                    total_tokens=result.prompt_tokens + result.completion_tokens),
        timing=Timing(queue_seconds=result.queue_seconds, time_to_first_token_seconds=result.ttft_seconds,
                      total_seconds=result.total_seconds),
        flops=Flops(executed=result.flops_executed, dense=dense, ratio=result.flops_executed / dense if dense else 1.0),
        routing=routing,
    )


# -------------------------------------------------------------------- OpenAI completions
def _prompts(svc: Service, body: CompletionRequest) -> list[tuple[list[int] | None, str | None]]:
    """Normalise `prompt` to (token ids or None, text or None) pairs."""
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise invalid("prompt", "must not be an empty list")
    if len(items) > svc.settings.max_prompts:
        raise invalid("prompt", f"at most {svc.settings.max_prompts} prompts per request, got {len(items)}", code="too_many_prompts")
    out: list[tuple[list[int] | None, str | None]] = []
    vocab = svc.config.vocab_size
    for i, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            if not item:
                raise invalid("prompt", f"{where} must not be empty")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise invalid("prompt", f"{where} is not valid Unicode text (unpaired surrogate)") from None
            out.append((None, item))
        else:
            if not item:
                raise invalid("prompt", f"{where} must not be an empty token list")
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise invalid("prompt", f"{where} has token ids outside [0, {vocab}): {bad[:5]}")
            out.append((list(item), None))
    return out


async def openai_completions(svc: Service, body: CompletionRequest, request: Request) -> Any:
    if body.model is not None and body.model != svc.name:
        raise APIError(404, f"model: '{body.model}' is not served here (available: '{svc.name}')", param="model",
                       code="model_not_found")
    items = _prompts(svc, body)
    texts = [t for _, t in items if t is not None]
    encoded = iter(await svc.encode(texts)) if texts else iter(())
    prompts: list[tuple[list[int], str, list[int]]] = []  # (ids with BOS, prompt text, char offsets of ids[1:])
    for ids, text in items:
        if text is not None:
            enc_ids, offsets = next(encoded)
            prompts.append((enc_ids, text, [start for start, _ in offsets[1:]]))
        else:
            full = ids if ids[0] == svc.bos else [svc.bos, *ids]
            text = svc.tokenizer.decode(full[1:], skip_special_tokens=False)
            offsets = [len(svc.tokenizer.decode(full[1:k], skip_special_tokens=False)) for k in range(1, len(full))]
            prompts.append((full, text, offsets))
    max_tokens = body.max_tokens
    for ids, _, _ in prompts:
        new = max_tokens if max_tokens is not None else max(1, svc.context - len(ids))
        svc.check_length(ids, new, "max_tokens")
    rid = "cmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    want_prompt_lp = body.echo and body.logprobs is not None
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    jobs: list[Job] = []
    if max_tokens == 0:
        if want_prompt_lp:
            jobs.append(ScoreJob([ids for ids, _, _ in prompts], svc.context, svc.context, body.logprobs, queue=queue, loop=loop,
                                 index=0, timeout=svc.settings.request_timeout))
    else:
        for i, (ids, _, _) in enumerate(prompts):
            for j in range(body.n):
                params = GenParams(max_new_tokens=max_tokens if max_tokens is not None else svc.context - len(ids),
                                   temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                   seed=None if body.seed is None else body.seed + j, stop=body.stop,
                                   logprobs=body.logprobs, prompt_logprobs=body.logprobs if want_prompt_lp else None)
                jobs.append(GenerateJob(ids, params, queue=queue, loop=loop, index=i * body.n + j, timeout=svc.settings.request_timeout))
    if jobs:
        svc.submit(jobs)
    n_choices = len(prompts) * body.n
    prompt_tokens = sum(len(ids) for ids, _, _ in prompts)

    def prompt_lp(i: int, entries: list[LogprobEntry] | None) -> dict[str, list]:
        ids, _, offsets = prompts[i]
        lp: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for k, tok in enumerate(ids[1:]):
            lp["tokens"].append(svc.engine.token_str(tok))
            lp["token_logprobs"].append(entries[k].logprob if entries else None)
            lp["top_logprobs"].append(_top(svc, entries[k]) if entries else None)
            lp["text_offset"].append(offsets[k])
        return lp

    def completion_lp(entries: list[LogprobEntry], base: int, texts_before: list[int]) -> dict[str, list]:
        return {"tokens": [svc.engine.token_str(e.id) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [_top(svc, e) for e in entries],
                "text_offset": [base + off for off in texts_before]}

    def scored_entries(score: ScoreResult, p: int) -> list[LogprobEntry]:
        return [LogprobEntry(t, lp, score.top[p][k] if score.top else None)
                for k, (t, lp) in enumerate(zip(prompts[p][0][1:], score.logprobs[p]))]

    def choice(index: int, result: GenerationResult | None, echo_entries: list[LogprobEntry] | None) -> CompletionChoice:
        p = index // body.n
        ptext = prompts[p][1]
        text = result.text if result else ""
        lp = None
        if body.logprobs is not None:
            merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            if body.echo:
                _extend(merged, prompt_lp(p, echo_entries))
            if result and result.token_logprobs:
                base = len(ptext) if body.echo else 0
                _extend(merged, completion_lp(result.token_logprobs, base, _offsets(svc, result.token_ids)))
            lp = CompletionLogprobs(**merged)
        finish = "length" if result is None or result.finish_reason == "length" else "stop"
        return CompletionChoice(index=index, text=(ptext if body.echo else "") + text, logprobs=lp, finish_reason=finish)

    if not body.stream:
        results: list[GenerationResult | None] = [None] * n_choices
        echoes: list[list[LogprobEntry] | None] = [None] * n_choices
        if jobs and isinstance(jobs[0], ScoreJob):
            score: ScoreResult = (await svc.collect(jobs, queue, request))[0]
            for i in range(n_choices):
                echoes[i] = scored_entries(score, i // body.n)
        elif jobs:
            for r, job in zip(await svc.collect(jobs, queue, request), jobs):
                results[job.index] = r
                echoes[job.index] = r.prompt_logprobs
        completion_tokens = sum(r.completion_tokens for r in results if r)
        return CompletionResponse(id=rid, created=created, model=svc.name,
                                  choices=[choice(i, results[i], echoes[i]) for i in range(n_choices)],
                                  usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens))

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, text: str, finish: str | None, lp: dict[str, list] | None = None) -> bytes:
        return sse({"id": rid, "object": "text_completion", "created": created, "model": svc.name,
                    "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]})

    async def stream() -> AsyncIterator[bytes]:
        completion_tokens = 0
        try:
            if not jobs or isinstance(jobs[0], ScoreJob):  # max_tokens == 0: the echo is the whole answer
                score: ScoreResult | None = None
                if jobs:
                    async for event in svc.events(jobs, queue, None):
                        if isinstance(event, DoneEvent):
                            score = event.result  # type: ignore[assignment]
                for i in range(n_choices):
                    p = i // body.n
                    entries = scored_entries(score, p) if score is not None else None
                    lp = prompt_lp(p, entries) if body.logprobs is not None and body.echo else None
                    yield chunk(i, prompts[p][1] if body.echo else "", "length", lp)
            else:
                sent_echo: set[int] = set()
                emitted = [0] * n_choices
                for i in range(n_choices):
                    if body.echo and not want_prompt_lp:
                        sent_echo.add(i)
                        yield chunk(i, prompts[i // body.n][1], None)
                async for event in svc.events(jobs, queue, None):
                    i = event.index
                    if isinstance(event, PromptEvent) and i not in sent_echo:
                        sent_echo.add(i)
                        yield chunk(i, prompts[i // body.n][1], None, prompt_lp(i // body.n, event.logprobs))
                    elif isinstance(event, TokenEvent):
                        lp = None
                        if body.logprobs is not None and event.logprobs is not None:
                            base = (len(prompts[i // body.n][1]) if body.echo else 0) + emitted[i]
                            lp = completion_lp(event.logprobs, base, [0] * len(event.logprobs))
                        emitted[i] += len(event.text)
                        if event.text or lp:
                            yield chunk(i, event.text, None, lp)
                    elif isinstance(event, DoneEvent):
                        result: GenerationResult = event.result  # type: ignore[assignment]
                        completion_tokens += result.completion_tokens
                        yield chunk(i, "", "length" if result.finish_reason == "length" else "stop")
            if include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": svc.name, "choices": [],
                           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens}})
            yield sse("[DONE]")
        except APIError as exc:
            yield svc.error_for_stream(request.url.path, exc)
        except (asyncio.CancelledError, GeneratorExit):  # the client hung up mid-stream
            svc.metrics.error(endpoint_label(request.url.path), "cancelled")
            raise

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _extend(into: dict[str, list], part: dict[str, list]) -> None:
    for key, values in part.items():
        into[key].extend(values)


def _top(svc: Service, entry: LogprobEntry) -> dict[str, float]:
    return {svc.engine.token_str(t): lp for t, lp in (entry.top or {}).items()}


def _offsets(svc: Service, token_ids: list[int]) -> list[int]:
    """Character offset of each generated token within the completion text."""
    return [len(svc.tokenizer.decode(token_ids[:k], skip_special_tokens=True)) for k in range(len(token_ids))]
