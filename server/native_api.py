"""The native protocol: /v1/generate, /v1/perplexity (and /v1/perplexity/text, server/perplexity_text.py)
and /v1/tokenize. Each handler turns the request into jobs, then the results into the response."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from model.accounting import attention_share
from model.scoring import Perplexity, total_nll
from server import perplexity_text, routes
from server.engine.requests import DoneEvent, GenerationResult, GenParams, RoutingTrace, ScoreResult, TokenEvent
from server.errors import ERRORS, invalid
from server.metrics import OPERATORS
from server.native_schemas import (
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
)
from server.sampling_params import engine_sampling
from server.schemas import Usage
from server.service import Jobs, ServedModels, Service, off_loop, sse


def register(app: FastAPI, served: ServedModels) -> None:
    """Add the native routes to `app`."""

    @app.post(routes.NATIVE_TOKENIZE.path, response_model=TokenizeResponse, responses=ERRORS, tags=["native"])
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        svc = served.get(body.model, request)
        ids = (await svc.scored_ids([body.text], "text", "tokenize"))[0].ids
        if not body.add_bos:
            ids = ids[1:]
        return TokenizeResponse(token_ids=ids, tokens=[svc.token_str(i) for i in ids], count=len(ids),
                                max_context=svc.context)

    @app.post(routes.GENERATE.path, response_model=GenerateResponse, responses=ERRORS, tags=["native"])
    async def generate(body: GenerateRequest, request: Request) -> Any:
        return await run_generate(served.get(body.model, request), body, request)

    @app.post(routes.PERPLEXITY.path, response_model=PerplexityResponse, responses=ERRORS, tags=["native"])
    async def perplexity(body: PerplexityRequest, request: Request) -> Response:
        return await run_perplexity(served.get(body.model, request), body, request)

    perplexity_text.register(app, served, perplexity)


async def run_generate(svc: Service, body: GenerateRequest, request: Request) -> Any:
    ids = (await svc.prompt_ids([body.prompt]))[0].ids
    asked = body.max_new_tokens if "max_new_tokens" in body.model_fields_set else None
    new_tokens = svc.new_tokens(asked, body.max_new_tokens, "max_new_tokens", ids)
    svc.check_length(ids, new_tokens, "max_new_tokens")
    logprobs = 0 if body.return_logprobs else None
    jobs = Jobs(svc)
    job = jobs.generate(ids, GenParams(
        max_new_tokens=new_tokens, **asdict(engine_sampling(body.temperature, body.top_p, body.top_k)), seed=body.seed,
        stop=body.stop, ignore_eos=body.ignore_eos, return_routing=body.return_routing, logprobs=logprobs,
        prompt_logprobs=logprobs))
    svc.submit(jobs, stream=body.stream)
    rid = "gen-" + job.id
    if not body.stream:
        return generate_response(svc, rid, ids, (await svc.collect(jobs, request))[0])

    async def stream() -> AsyncIterator[bytes]:
        async for event in svc.events(jobs):
            if isinstance(event, TokenEvent):
                token = {"type": "token", "id": rid, "text": event.text, "token_ids": event.token_ids}
                if event.logprobs is not None:
                    token["logprobs"] = [e.logprob for e in event.logprobs]
                yield sse(token)
            elif isinstance(event, DoneEvent):
                yield sse({"type": "done", **generate_response(svc, rid, ids, event.result).model_dump()})  # type: ignore[arg-type]

    return svc.sse_response(stream(), request)


async def run_perplexity(svc: Service, body: PerplexityRequest, request: Request) -> Response:
    texts = [body.text] if isinstance(body.text, str) else body.text
    limit = svc.settings.max_prompts
    if len(texts) > limit:
        raise invalid("text", f"at most {limit} texts per request, got {len(texts)}", code="too_many_prompts")
    stride = body.stride if body.stride is not None else max(1, svc.context // 2)
    if stride > svc.context:
        raise invalid("stride", f"must be <= the context ({svc.context} tokens), got {stride}")
    seqs = [encoded.ids for encoded in await svc.scored_ids(texts, "text")]  # refused before tokenizing past the limit
    svc.check_score_kv(seqs, "text")
    jobs = Jobs(svc)
    jobs.score(seqs, svc.context, stride, None, routing=body.return_routing)
    svc.submit(jobs, stream=False)
    result: ScoreResult = (await svc.collect(jobs, request))[0]

    def render() -> bytes:
        return perplexity_response(svc, body, texts, seqs, stride, result).model_dump_json().encode()

    # 131072 log-probabilities are ~1 s of objects and response validation: built off the event loop
    return Response(await off_loop(sum(map(len, seqs)), render), media_type="application/json")


def perplexity_result(svc: Service, body: PerplexityRequest, i: int, text: str, ids: list[int],
                      result: ScoreResult) -> PerplexityResult:
    """Text i's scores, routing counts and FLOPs."""
    lps = result.logprobs[i]
    p = Perplexity.of_text(text, total_nll(lps), len(lps))
    counts = result.counts[i]
    logprobs = [TokenLogprob(token=svc.token_str(t), id=t, logprob=lp) for t, lp in zip(ids[1:], lps)]
    return PerplexityResult(
        index=i, tokens=p.tokens, words=p.words, bytes=p.bytes, nll=p.nll, mean_nll=p.mean_nll,
        perplexity=p.token_ppl or float("nan"), word_perplexity=p.word_ppl, bits_per_byte=p.bits_per_byte,
        windows=result.windows[i], logprobs=logprobs if body.return_logprobs else None,
        routing=RoutingCounts(operator_names=list(OPERATORS), per_layer=counts,
                              attention_share=attention_share(counts, svc.config.routing_layers)),
        flops=Flops.of(*result.flops[i]) if result.flops else Flops.of(0.0, 0.0),
        token_routing=routing_payload(svc, ids[:-1], len(ids), result.routing[i]) if result.routing else None)


def perplexity_response(svc: Service, body: PerplexityRequest, texts: list[str], seqs: list[list[int]], stride: int,
                        result: ScoreResult) -> PerplexityResponse:
    results = [perplexity_result(svc, body, i, text, seqs[i], result) for i, text in enumerate(texts)]
    total = sum(len(s) - 1 for s in seqs)
    return PerplexityResponse(model=svc.name, window=svc.context, stride=stride, results=results,
                              usage=Usage.of(total, 0, sum(result.cached_tokens or [])),
                              timing=Timing(queue_seconds=result.queue_seconds, time_to_first_token_seconds=None,
                                            total_seconds=result.total_seconds))


def routing_payload(svc: Service, processed: list[int], prompt_tokens: int, trace: RoutingTrace) -> Routing:
    return Routing(operator_names=list(OPERATORS), tokens=[svc.token_str(t) for t in processed], token_ids=processed,
                   prompt_tokens=prompt_tokens, operator=trace.operator, entropy=trace.entropy, gate=trace.gate,
                   thresholds=svc.cut_points)


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
        flops=Flops.of(result.flops_executed, result.flops_dense), routing=routing, logprobs=logprobs)
