"""FastAPI app: native generate/perplexity/tokenize, health, metrics, playground; registers the OpenAI,
chat and tokenizer routes from their own modules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from model import ChiarConfig, Operator
from model.scoring import Perplexity, total_nll
from server import chat, docs_pages, openai_api, openapi, perplexity_text, tokenizer_api
from server.body_timeout import BodyTimeout
from server.engine import DoneEvent, GenerateJob, GenerationResult, GenParams, ScoreJob, ScoreResult, TokenEvent
from server.engine.requests import RoutingTrace
from server.errors import install_handlers, invalid
from server.metrics import NO_MODEL, OPERATORS, Metrics
from server.middleware import BearerAuth, BodyBudget, BodyLimit, RequestMetrics, endpoint_label
from server.openapi_limits import DocLimits, ModelLimits
from server.schemas import (
    Flops,
    GenerateRequest,
    GenerateResponse,
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
from server.service import ServedModels, Service, off_loop, sse
from server.settings import Settings

STATIC = Path(__file__).parent / "static"
ERRORS = openai_api.ERRORS


# -------------------------------------------------------------------- app factory
def create_app(settings: Settings, models: list[Service], metrics: Metrics) -> FastAPI:
    """The app serving `models` (one Service per model and engine; the first is the default)."""
    served = ServedModels(models)
    engines = [svc.engine for svc in served]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for engine in engines:
            engine.start()
        yield
        # all engines drain together: each gets the whole drain timeout, not one after the other
        await asyncio.gather(*(asyncio.to_thread(engine.stop, settings.drain_timeout) for engine in engines))

    app = FastAPI(title="CHIAR-Former inference server", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Hard-gated CHIAR-Former: native generate/perplexity, OpenAI-compatible completions.")
    docs_pages.register(app)  # /docs and /redoc with their assets served here (offline)
    app.state.served = served
    install_handlers(app, lambda request, err: metrics.error(endpoint_label(request.url.path), err.reason,
                                                             getattr(request.state, "model", NO_MODEL)))

    # ---------------------------------------------------------------- health
    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: {"description": "loading or warming up"}})
    async def ready() -> JSONResponse:
        """200 once every engine is warm; 503 while any is loading, draining or failed (that state is reported)."""
        statuses = [engine.status() for engine in engines]
        if all(status.ready for status in statuses):
            return JSONResponse({"status": "ready", "model": served.default.name, "models": [svc.name for svc in served]})
        state = "failed" if any(s.failed for s in statuses) else ("draining" if any(s.draining for s in statuses) else "loading")
        return JSONResponse({"status": state}, status_code=503,
                            headers={"Retry-After": str(max(s.retry_after for s in statuses))})

    @app.get("/metrics", tags=["ops"])
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- tokenize, models
    @app.post("/v1/tokenize", response_model=TokenizeResponse, responses=ERRORS, tags=["native"])
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        svc = served.get(body.model, request)
        ids = (await svc.scored_ids([body.text], "text", "tokenize"))[0].ids
        if not body.add_bos:
            ids = ids[1:]
        return TokenizeResponse(token_ids=ids, tokens=[svc.engine.token_str(i) for i in ids], count=len(ids), max_context=svc.context)

    # ---------------------------------------------------------------- generate
    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS, tags=["native"])
    async def generate(body: GenerateRequest, request: Request) -> Any:
        svc = served.get(body.model, request)
        ids = (await svc.prompt_ids([body.prompt]))[0].ids
        new_tokens = svc.new_tokens(body.max_new_tokens if "max_new_tokens" in body.model_fields_set else None,
                                    body.max_new_tokens, "max_new_tokens", ids)
        svc.check_length(ids, new_tokens, "max_new_tokens")
        params = GenParams(max_new_tokens=new_tokens, temperature=body.temperature, top_k=body.top_k,
                           top_p=body.top_p, seed=body.seed, stop=body.stop, ignore_eos=body.ignore_eos,
                           return_routing=body.return_routing,
                           logprobs=0 if body.return_logprobs else None, prompt_logprobs=0 if body.return_logprobs else None)
        queue: asyncio.Queue = asyncio.Queue()
        job = GenerateJob(ids, params, queue=queue, loop=asyncio.get_running_loop(), index=0, timeout=settings.request_timeout)
        svc.submit([job])
        rid = "gen-" + job.id

        def final(result: GenerationResult) -> GenerateResponse:
            return generate_response(svc, rid, ids, result)

        if not body.stream:
            return final((await svc.collect([job], queue, request))[0])

        async def stream() -> AsyncIterator[bytes]:
            async for event in svc.events([job], queue, None):
                if isinstance(event, TokenEvent):
                    token = {"type": "token", "id": rid, "text": event.text, "token_ids": event.token_ids}
                    if event.logprobs is not None:
                        token["logprobs"] = [e.logprob for e in event.logprobs]
                    yield sse(token)
                elif isinstance(event, DoneEvent):
                    yield sse({"type": "done", **final(event.result).model_dump()})  # type: ignore[arg-type]

        return svc.sse_response(stream(), request)

    # ---------------------------------------------------------------- perplexity
    @app.post("/v1/perplexity", response_model=PerplexityResponse, responses=ERRORS, tags=["native"])
    async def perplexity(body: PerplexityRequest, request: Request) -> Response:
        svc = served.get(body.model, request)
        texts = [body.text] if isinstance(body.text, str) else body.text
        if len(texts) > settings.max_prompts:
            raise invalid("text", f"at most {settings.max_prompts} texts per request, got {len(texts)}", code="too_many_prompts")
        stride = body.stride if body.stride is not None else max(1, svc.context // 2)
        if stride > svc.context:
            raise invalid("stride", f"must be <= the context ({svc.context} tokens), got {stride}")
        seqs = [encoded.ids for encoded in await svc.scored_ids(texts, "text")]  # refused before tokenizing past the limit
        svc.check_score_kv(seqs, "text")
        queue: asyncio.Queue = asyncio.Queue()
        job = ScoreJob(seqs, svc.context, stride, None, routing=body.return_routing, queue=queue, loop=asyncio.get_running_loop(), index=0,
                       timeout=settings.request_timeout)
        svc.submit([job])
        result: ScoreResult = (await svc.collect([job], queue, request))[0]

        def render() -> bytes:
            return perplexity_response(svc, body, texts, seqs, stride, result).model_dump_json().encode()

        # 131072 log-probabilities are ~1 s of objects and response validation: built off the event loop
        return Response(await off_loop(sum(map(len, seqs)), render), media_type="application/json")

    # ---------------------------------------------------------------- OpenAI, chat, tokenizer (own modules)
    openai_api.register(app, served)
    chat.register(app, served)
    tokenizer_api.register(app, served)
    perplexity_text.register(app, served, perplexity)
    openapi.install(app, api_key=settings.api_key is not None, limits=DocLimits(
        vocab_size=max(svc.config.vocab_size for svc in served), max_prompts=settings.max_prompts,
        models=tuple(ModelLimits(svc.name, svc.context, svc.max_new_tokens) for svc in served)))

    # ---------------------------------------------------------------- playground
    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:  # browsers ask for it whatever the page links
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # middleware: added last = outermost
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_error=metrics.error,
                       budget=BodyBudget(settings.max_inflight_body_bytes),
                       per_path={perplexity_text.PATH: perplexity_text.body_limit(served, settings)})
    app.add_middleware(BodyTimeout, seconds=settings.body_timeout)
    app.add_middleware(BearerAuth, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def perplexity_response(svc: Service, body: PerplexityRequest, texts: list[str], seqs: list[list[int]], stride: int,
                        result: ScoreResult) -> PerplexityResponse:
    results = []
    for i, text in enumerate(texts):
        lps = result.logprobs[i]
        p = Perplexity.of_text(text, total_nll(lps), len(lps))
        counts = result.counts[i]
        routing_layers = [row for layer, row in enumerate(counts) if 0 < layer < len(counts) - 1]
        routed = sum(sum(row) for row in routing_layers)
        results.append(PerplexityResult(
            index=i, tokens=p.tokens, words=p.words, bytes=p.bytes, nll=p.nll, mean_nll=p.mean_nll,
            perplexity=p.token_ppl or float("nan"), word_perplexity=p.word_ppl, bits_per_byte=p.bits_per_byte,
            windows=result.windows[i],
            logprobs=[TokenLogprob(token=svc.engine.token_str(t), id=t, logprob=lp) for t, lp in zip(seqs[i][1:], lps)]
            if body.return_logprobs else None,
            routing=RoutingCounts(operator_names=list(OPERATORS), per_layer=counts,
                                  attention_share=(sum(row[Operator.ATTENTION] for row in routing_layers) / routed) if routed else None),
            flops=flops_of(*result.flops[i]) if result.flops else flops_of(0.0, 0.0),
            token_routing=routing_payload(svc, seqs[i][:-1], len(seqs[i]), result.routing[i]) if result.routing else None,
        ))
    total = sum(len(s) - 1 for s in seqs)
    return PerplexityResponse(model=svc.name, window=svc.context, stride=stride, results=results,
                              usage=Usage.of(total, 0, sum(result.cached_tokens or [])),
                              timing=Timing(queue_seconds=result.queue_seconds, time_to_first_token_seconds=None,
                                            total_seconds=result.total_seconds))


def router_cut_points(config: ChiarConfig) -> list[list[float]]:
    """Per layer, the entropy values its router compares with ([] where the layer does not route)."""
    cuts: list[list[float]] = [[] for _ in range(config.n_layers)]
    for r in range(config.n_routing_layers):  # routing layers are 2..L-1 (indices 1..L-2)
        cuts[r + 1] = list(config.bands[r]) if config.three_operators and config.bands else [config.resolved_thresholds()[r]]
    return cuts


def routing_payload(svc: Service, processed: list[int], prompt_tokens: int, trace: RoutingTrace) -> Routing:
    return Routing(operator_names=list(OPERATORS), tokens=[svc.engine.token_str(t) for t in processed], token_ids=processed,
                   prompt_tokens=prompt_tokens, operator=trace.operator, entropy=trace.entropy, gate=trace.gate,
                   thresholds=router_cut_points(svc.config))


def generate_response(svc: Service, rid: str, prompt_ids: list[int], result: GenerationResult) -> GenerateResponse:
    routing = None
    if result.routing is not None:
        processed = (prompt_ids + result.token_ids)[: len(result.routing.operator)]
        routing = routing_payload(svc, processed, len(prompt_ids), result.routing)
    logprobs = None
    if result.prompt_logprobs is not None and result.token_logprobs is not None:
        logprobs = [None, *(e.logprob for e in result.prompt_logprobs), *(e.logprob for e in result.token_logprobs)]
    return GenerateResponse(
        id=rid, model=svc.name, text=result.text, token_ids=result.token_ids, finish_reason=str(result.finish_reason),
        usage=Usage.of(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
        timing=Timing(queue_seconds=result.queue_seconds, time_to_first_token_seconds=result.ttft_seconds,
                      total_seconds=result.total_seconds),
        flops=flops_of(result.flops_executed, result.flops_dense),
        routing=routing,
        logprobs=logprobs,
    )


def flops_of(executed: float, dense: float) -> Flops:
    """Executed vs dense-baseline FLOPs; the ratio is 1 where nothing ran."""
    return Flops(executed=executed, dense=dense, ratio=executed / dense if dense else 1.0)
